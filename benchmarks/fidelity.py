"""Fidelity and cost of the unlearning methods against exact retraining, per regime.

One command trains a run in a regime, removes samples, computes the exact-retrain
oracle, runs every method and writes one JSON row per method with parameter and
function-space error and cost (gradient-equivalents and wall time, each as a
ratio to exact replay measured in the same run), plus a PNG of error against
cost with "do nothing" and replay marked.

Regimes (DESIGN §3):

- ``--regime old``: one epoch over the data; the forgotten samples are used
  once each, early (from step 5% of the run on): an old request in a long run;
- ``--regime recent``: one epoch; the samples are used about 10% before the end
  (later, a cosine schedule has almost no learning rate left: nothing was learned);
- ``--regime recurring``: ``--epochs`` (3) epochs; random samples, used every epoch.

``--init pretrained`` (default) fine-tunes the project's own pretrained base
(``lmcleaner pretrain``, cached) with a small learning rate, the regime of our
users; ``--init scratch`` trains from random initialisation (the most nonlinear
case). Optimizers: ``--optimizer adamw|sgd`` and ``--clip`` (max grad norm, 0 = off).

    python benchmarks/fidelity.py --regime old --init pretrained --optimizer adamw --seed 1 \\
        --json bench_out/fidelity_old_pre_adamw.json

Columns: ``rel_param_error`` (||θ̂-θ_re|| / ||θ-θ_re||, 1 = doing nothing),
``kl_forget_ratio`` (KL to the oracle on the forget set / the untouched
model's), ``mia_gap`` (|AUC - AUC_oracle|, best of LOSS and min-k% attacks,
forget vs holdout), ``estimated_error`` (what the method itself predicts),
``cost_vs_replay`` (gradient-equivalents) and ``wall_vs_replay``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from lmcleaner.config import load_config
from lmcleaner.evaluate import format_table
from lmcleaner.evaluate.compare import baseline_grid, compare_methods
from lmcleaner.train import Trainer
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.session import UnlearnSession

LRS = {("pretrained", "adamw"): 3e-4, ("pretrained", "sgd"): 0.02, ("scratch", "adamw"): 1e-3,
       ("scratch", "sgd"): 0.05}
MAX_AUTHORS = 800  # the embedded generator's name pool (with holdout authors)


def regime_config(args, run_dir: Path) -> tuple[list[str], int, int]:
    """Overrides, number of training rows, epochs."""
    bs = args.batch_size
    epochs = args.epochs if args.regime == "recurring" else 1
    rows = min(args.steps * bs // epochs, MAX_AUTHORS * 8)
    lr = args.lr or LRS[(args.init, args.optimizer)]
    ov = [f"model={args.model}", f"training.optimizer={args.optimizer}", f"training.seed={args.seed}",
          f"training.max_steps={args.steps}", f"training.num_samples={rows}", f"training.batch_size={bs}",
          f"training.dataset_name=embedded:{(rows + 7) // 8}", f"training.learning_rate={lr}",
          f"training.max_grad_norm={args.clip}", f"training.warmup_steps={max(1, args.steps // 30)}",
          "training.progress_bar=false", "training.logging_steps=0", f"training.output_dir={run_dir}",
          f"training.torch_threads={args.threads}", f"training_logger.max_steps={args.steps}",
          f"training_logger.checkpoint_interval={args.C}"]
    if args.init == "pretrained":
        ov += [f"model.name_or_path=base:{args.model}", "model.tokenizer=embedded"]
    return ov + list(args.overrides), rows, epochs


def pick_forget(trainer, args) -> list[int]:
    plan, steps, n = trainer.plan, args.steps, args.forget
    if args.regime == "recurring":
        g = torch.Generator().manual_seed(args.seed)
        return sorted(torch.randperm(len(trainer.dataset), generator=g)[:n].tolist())
    # recent: 10-12% before the end, where a cosine schedule still has ~3% of its peak rate (in the last
    # few steps it has almost none: the samples would barely have been learned)
    start = max(1, round(0.05 * steps)) if args.regime == "old" else steps - max(n + 1, round(0.12 * steps))
    g = torch.Generator().manual_seed(args.seed)
    ids = []
    for k in range(n):  # one sample from each of n consecutive batches
        mb = [i for b in plan.micro_batches(start + k) for i in b]
        ids.append(mb[int(torch.randint(len(mb), (1,), generator=g))])
    return sorted(ids)


def grid_for(args, tau: int) -> list[tuple[str, dict]]:
    Ks = [int(k) for k in args.Ks.split(",") if k]
    grid: list[tuple[str, dict]] = [("replay", {})]
    if "linear" in args.families:
        for K in sorted({*Ks, tau}):
            grid.append(("LMCleanerSampleLevel", {"hessian_mode": "exact", "K": K}))
    if "window" in args.families:
        for K in Ks:
            for carry in args.carries.split(","):
                grid.append(("LMCleanerSampleLevel", {"propagation": "replay", "K": K, "carry": carry}))
        for tol in [float(t) for t in args.tols.split(",") if t]:
            for carry in args.tol_carries.split(","):
                grid.append(("LMCleanerSampleLevel", {"propagation": "replay", "K": Ks[0], "carry": carry,
                                                      "tol": tol}))
    if "baselines" in args.families:
        grid += [("rollback", {}), *baseline_grid()]
    if "auto" in args.families:
        grid.append(("auto", {}))
        grid += [("auto", {"carry": c}) for c in args.auto_carries.split(",") if c]
    return grid


def plot(out: dict, path: Path) -> None:
    from lmcleaner.evaluate.report import plot_error_vs_cost

    plot_error_vs_cost(out["rows"], path, title=f"regime={out['regime']} init={out['init']} "
                       f"optimizer={out['optimizer']} clip={out['clip']} seed={out['seed']} steps={out['steps']}")


def add_regime_args(ap: argparse.ArgumentParser) -> None:
    """The run and request settings of a regime (shared with ``benchmarks/anatomy.py``)."""
    ap.add_argument("--regime", choices=["old", "recent", "recurring"], default="old")
    ap.add_argument("--init", choices=["pretrained", "scratch"], default="pretrained")
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    ap.add_argument("--clip", type=float, default=0.0, help="max grad norm (0: no clipping)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=3, help="recurring regime: epochs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--forget", type=int, default=4, help="number of samples to forget")
    ap.add_argument("--C", type=int, default=20, help="checkpoint interval of the recorder")
    ap.add_argument("--lr", type=float, default=None, help="default: by init and optimizer (see LRS)")
    ap.add_argument("--model", default="tiny-llama", help="model preset")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")


def parse_regime_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse (trailing config overrides allowed) and set the process up as the settings say."""
    ap.add_argument("overrides", nargs="*", help="config overrides of the trained run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_regime_args(ap)
    ap.add_argument("--Ks", default="10,40", help="window / truncation lengths")
    ap.add_argument("--carries", default="frozen,momentum", help="carries of the windowed method")
    ap.add_argument("--tols", default="0.1", help="adaptive windows: tolerances")
    ap.add_argument("--auto-carries", default="", help="extra auto rows with these carries (comma list)")
    ap.add_argument("--tol-carries", default="frozen", help="carries of the adaptive windows")
    ap.add_argument("--families", default="linear,window,baselines,auto",
                    help="comma list of: linear (HVP propagation), window (exact windows + carry), baselines, auto")
    ap.add_argument("--json", default="bench_out/fidelity.json")
    args = parse_regime_args(ap)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        overrides, rows, epochs = regime_config(args, run_dir)
        t0 = time.perf_counter()
        trainer = Trainer(load_config(overrides=overrides))
        state = trainer.train()
        train_seconds = time.perf_counter() - t0
        ids = pick_forget(trainer, args)
        t0 = time.perf_counter()
        oracle_trainer = Trainer(retrain_config(run_dir, ids, Path(tmp) / "retrain"))
        oracle_trainer.train()
        retrain_seconds = time.perf_counter() - t0
        oracle = {n: p.detach().clone() for n, p in oracle_trainer.engine.trainable().items()}
        session = UnlearnSession(run_dir)
        ds = trainer.dataset
        forget_set = set(ids)
        retain = [ds[i] for i in range(len(ds)) if i not in forget_set][:32]
        holdout = build_holdout(trainer, 40)
        grid = grid_for(args, session.tau)
        result_rows = compare_methods(session, ids, grid, oracle, [ds[i] for i in ids], retain,
                                      holdout_items=holdout, do_nothing_row=True, progress=False)
    clipped = sum(1 for h in state.history if args.clip > 0 and h["grad_norm"] > args.clip)
    uses = result_rows[1]["steps_touched"] if len(result_rows) > 1 else None
    out = {"regime": args.regime, "init": args.init, "optimizer": args.optimizer, "clip": args.clip,
           "seed": args.seed, "steps": args.steps, "epochs": epochs, "rows_trained": rows, "forget_ids": ids,
           "uses": uses, "clipped_steps": clipped, "train_seconds": train_seconds,
           "retrain_seconds": retrain_seconds, "final_loss": state.history[-1]["loss"],
           "params": sum(p.numel() for p in oracle.values()), "torch_threads": args.threads, "rows": result_rows}
    print(format_table(result_rows, columns=["name", "rel_param_error", "kl_forget_ratio", "mia_gap",
                                             "estimated_error", "diverged", "grad_equivalents", "cost_vs_replay",
                                             "wall_vs_replay", "chosen"]))
    print(f"regime={args.regime} init={args.init} optimizer={args.optimizer} clip={args.clip} seed={args.seed} "
          f"steps={args.steps} forget={ids} ({uses} uses); clipped steps {clipped}; "
          f"train {train_seconds:.1f}s, retrain {retrain_seconds:.1f}s")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    png = path.with_suffix(".png")
    plot(out, png)
    print(f"wrote {path} and {png}")


def build_holdout(trainer, n: int) -> list[dict]:
    """Encoded rows of authors never trained on (membership-inference non-members)."""
    from lmcleaner.data import build_dataset

    ds = build_dataset(trainer.t, trainer.tokenizer, split="holdout", progress=False)
    return [ds[i] for i in range(min(n, len(ds)))]


if __name__ == "__main__":
    main()
