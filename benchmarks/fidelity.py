"""Fidelity and cost of every unlearning method against exact retraining.

Trains the default model with the recorder, removes a few samples, computes
the exact-retrain oracle, then runs each method x hessian_mode x K (the full
window included) and writes one JSON row per run:
``optimizer, method, hessian_mode, K, rel_param_error, kl_forget, kl_retain,
seconds, grad_equivalents, replay_seconds`` (+ cost_vs_replay, recovery_steps).

    python benchmarks/fidelity.py --optimizer adamw --seed 0 --steps 60 --json bench_out/fidelity_adamw.json

Regime: the forgotten samples recur every epoch, so with several epochs the
earliest use is near step 0 and recovering past parameters (replay from the
checkpoints) is a large share of LMCleaner's cost; `--forget-late` picks
samples first used in the last part of training instead (old vs recent
requests, DESIGN §3 cost model).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmcleaner.config import load_config
from lmcleaner.evaluate import format_table
from lmcleaner.evaluate.compare import compare_methods, default_grid
from lmcleaner.train import Trainer
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.session import UnlearnSession


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--num-samples", type=int, default=96, help="training rows (embedded data)")
    ap.add_argument("--forget", type=int, default=3, help="number of samples to forget")
    ap.add_argument("--data", default="embedded", help="dataset (embedded, embedded:N authors, or a path)")
    ap.add_argument("--pick", choices=["random", "early"], default="random",
                    help="random ids, or ids from the batch of step --pick-step (an old request)")
    ap.add_argument("--pick-step", type=int, default=2)
    ap.add_argument("--Ks", default="5,15", help="truncation windows besides the full window")
    ap.add_argument("--modes", default="exact,GGN", help="hessian modes")
    ap.add_argument("--model", default="tiny-llama", help="model preset")
    ap.add_argument("--lr", type=float, default=None, help="default: 3e-3 (adamw), 0.05 (sgd)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    ap.add_argument("--json", default="bench_out/fidelity.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lr = args.lr or (3e-3 if args.optimizer == "adamw" else 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cfg = load_config(overrides=[
            f"model={args.model}", f"training.optimizer={args.optimizer}", f"training.seed={args.seed}",
            f"training.max_steps={args.steps}", f"training.num_samples={args.num_samples}",
            f"training.dataset_name={args.data}",
            f"training.learning_rate={lr}", f"training.max_grad_norm={args.max_grad_norm}",
            "training.progress_bar=false", "training.logging_steps=0", f"training.output_dir={run_dir}",
            f"training_logger.max_steps={args.steps}", f"training_logger.checkpoint_interval={max(5, args.steps // 10)}",
            *args.overrides])
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        state = trainer.train()
        train_seconds = time.perf_counter() - t0
        g = torch.Generator().manual_seed(args.seed)
        if args.pick == "early":
            ids = sorted(i for mb in trainer.plan.micro_batches(args.pick_step) for i in mb)[: args.forget]
        else:
            ids = sorted(torch.randperm(len(trainer.dataset), generator=g)[: args.forget].tolist())
        t0 = time.perf_counter()
        oracle_trainer = Trainer(retrain_config(run_dir, ids, Path(tmp) / "retrain"))
        oracle_trainer.train()
        retrain_seconds = time.perf_counter() - t0
        oracle = {n: p.detach().clone() for n, p in oracle_trainer.engine.trainable().items()}
        session = UnlearnSession(run_dir)
        ds = trainer.dataset
        retain = [ds[i] for i in range(len(ds)) if i not in set(ids)][:32]
        grid = default_grid(session.tau, [int(k) for k in args.Ks.split(",") if k], args.modes.split(","), level="sample")
        rows = compare_methods(session, ids, grid, oracle, [ds[i] for i in ids], retain)
    clipped = sum(1 for h in state.history if args.max_grad_norm > 0 and h["grad_norm"] > args.max_grad_norm)
    for r in rows:
        r.update(optimizer=args.optimizer, seed=args.seed, steps=args.steps)
    out = {"regime": "old request" if args.pick == "early" else "random samples", "rows": rows, "forget_ids": ids, "steps_touched": rows[0]["steps_touched"], "clipped_steps": clipped,
           "train_seconds": train_seconds, "retrain_seconds": retrain_seconds,
           "params": sum(p.numel() for p in oracle.values()), "torch_threads": args.threads}
    print(format_table(rows, columns=["name", "rel_param_error", "kl_forget", "kl_retain", "seconds",
                                      "grad_equivalents", "cost_vs_replay", "recovery_steps"]))
    print(f"regime={out['regime']} optimizer={args.optimizer} steps={args.steps} forget={ids} used in {out['steps_touched']} steps; "
          f"clipped steps {clipped}; train {train_seconds:.1f}s, from-scratch retrain {retrain_seconds:.1f}s")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
