"""Certified removal: membership inference and utility against epsilon, from one command.

Fine-tunes a model with the recorder (``--init pretrained``, default: the
project's own pretrained base, ``lmcleaner pretrain``, cached; ``--init scratch``:
random initialisation), forgets a few authors of the embedded QA data, computes
the exact-retrain oracle, unlearns with LMCleaner (default: exact windows of
``--K`` steps with a frozen carry, the approximation ``auto`` uses;
``--propagation linear``: HVP propagation), and for each noise variant
and epsilon adds the calibrated Gaussian noise (``unlearn/certify``) and
evaluates the certified model and the oracle with the *same* noise draw
(``evaluate/certification.py``): LOSS / zlib / min-k% / min-k%++ AUC on forget
vs held-out rows, retain loss, ROUGE-L and model utility. Writes JSON and a
PNG of AUC and utility against epsilon, and prints the table.

    python benchmarks/certify.py                       # pretrained, AdamW, windowed LMCleaner, epsilons 0.5..8, inf
    python benchmarks/certify.py --optimizer sgd --json bench_out/certify_sgd.json --png bench_out/certify_sgd.png
    python benchmarks/certify.py --propagation linear  # the linear (HVP) propagation over the full window

Variants (where the residual bound comes from, ``docs/certification.md``):
``formal`` (proven worst case from clipping and the recorded learning
rates), ``formal_lipschitz`` (plain SGD only: assumes non-expansive steps),
``empirical`` (measured ||theta_hat - theta'||, isotropic noise: NOT a formal
guarantee), ``empirical_subspace`` (the same split between the top-r
curvature subspace and the rest). Target (issue 12): at epsilon = 1 the
certified model's best AUC within 0.02 of the noised oracle's and its model
utility within 10% of the oracle's; ``reached_at`` says where it is met.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from lmcleaner.config import load_config
from lmcleaner.evaluate import EvalData, format_table
from lmcleaner.evaluate.certification import certification_sweep
from lmcleaner.evaluate.report import (
    CERTIFICATION_COLUMNS,
    certification_table,
    plot_certification,
)
from lmcleaner.train import Trainer
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.session import UnlearnSession

LRS = {("pretrained", "adamw"): 3e-4, ("pretrained", "sgd"): 0.02, ("scratch", "adamw"): 1e-3,
       ("scratch", "sgd"): 0.05}


def training_overrides(args, run_dir: Path) -> list[str]:
    lr = args.lr or LRS[(args.init, args.optimizer)]
    ov = [f"model={args.model}", f"training.optimizer={args.optimizer}", f"training.seed={args.seed}",
          f"training.num_epochs={args.epochs}", f"training.batch_size={args.batch_size}",
          "training.dataset_name=embedded", f"training.learning_rate={lr}", f"training.max_grad_norm={args.clip}",
          "training.momentum=0" if args.optimizer == "sgd" else "training.momentum=0.9",
          "training.warmup_steps=4", "training.progress_bar=false", "training.logging_steps=0",
          f"training.output_dir={run_dir}", f"training.torch_threads={args.threads}",
          "training_logger.max_steps=100000", f"training_logger.checkpoint_interval={args.C}"]
    if args.init == "pretrained":
        ov += [f"model.name_or_path=base:{args.model}", "model.tokenizer=embedded"]
    return ov + list(args.overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", choices=["pretrained", "scratch"], default="pretrained")
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--lr", type=float, default=None, help="default: 3e-4 adamw / 0.02 sgd pretrained")
    ap.add_argument("--clip", type=float, default=1.0, help="max grad norm (0: off, no formal bound)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--C", type=int, default=10, help="checkpoint interval")
    ap.add_argument("--forget-authors", default="0,1,2,3", help="embedded authors to forget (8 rows each)")
    ap.add_argument("--method", default="LMCleanerSampleLevel")
    ap.add_argument("--K", type=int, default=0, help="propagation window (0: full)")
    ap.add_argument("--hessian-mode", default="exact")
    ap.add_argument("--propagation", choices=["linear", "replay"], default="replay",
                    help="LMCleaner inside the window: linear (HVPs) or replay (exact windows, unlearn/windowed.py)")
    ap.add_argument("--carry", default="frozen", help="propagation=replay: carry past the window")
    ap.add_argument("--eps", default="0.5,1,2,4,8,inf")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--variants", default="formal,formal_lipschitz,empirical,empirical_subspace")
    ap.add_argument("--rank", type=int, default=16, help="subspace rank of empirical_subspace")
    ap.add_argument("--draws", type=int, default=2, help="noise draws per epsilon")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--max-retain", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="bench_out/certify.json")
    ap.add_argument("--png", default="bench_out/certify.png")
    ap.add_argument("overrides", nargs="*", help="extra training overrides (key=value)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    epsilons = [math.inf if e.strip() in ("inf", "∞") else float(e) for e in args.eps.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    if args.optimizer != "sgd" and "formal_lipschitz" in variants:
        variants.remove("formal_lipschitz")  # derived for plain SGD only (bound.py)
    authors = [int(a) for a in args.forget_authors.split(",")]
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        trainer = Trainer(load_config(overrides=training_overrides(args, run_dir)))
        state = trainer.train()
        timings["train"] = time.perf_counter() - t0
        ids = [i for i, r in enumerate(trainer.dataset.records) if r["author_index"] in set(authors)]
        t0 = time.perf_counter()
        oracle_trainer = Trainer(retrain_config(run_dir, ids, Path(tmp) / "retrain"), tokenizer=trainer.tokenizer)
        oracle_trainer.train()
        timings["retrain"] = time.perf_counter() - t0
        oracle = {n: p.detach().clone() for n, p in oracle_trainer.engine.trainable().items()}
        session = UnlearnSession(run_dir)
        t0 = time.perf_counter()
        kw: dict = {}
        if "LMCleaner" in args.method and args.propagation == "replay":
            kw = {"propagation": "replay", "K": args.K or 20, "carry": args.carry}
        elif "LMCleaner" in args.method:
            kw = {"K": args.K or session.tau, "hessian_mode": args.hessian_mode}
        result = session.run(args.method, ids, **kw)
        timings["unlearn"] = time.perf_counter() - t0
        theta = session.replayer.state_at(session.tau)[0]

        def dist(a, b):
            return math.sqrt(sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in b))

        fidelity = {"residual": dist(result.params, oracle), "removal_distance": dist(theta, oracle),
                    "param_norm": math.sqrt(sum(float((p.double() ** 2).sum()) for p in theta.values()))}
        fidelity["rel_param_error"] = fidelity["residual"] / fidelity["removal_distance"]
        data = EvalData.embedded(forget_ids=ids, max_retain=args.max_retain)
        t0 = time.perf_counter()
        sweep = certification_sweep(session, result, oracle, data, epsilons, variants, delta=args.delta,
                                    draws=args.draws, rank=args.rank, seed=args.seed,
                                    max_new_tokens=args.max_new_tokens, progress=False)
        timings["certify_and_eval"] = time.perf_counter() - t0
        clipped = sum(1 for h in state.history if args.clip > 0 and h["grad_norm"] > args.clip)
        out = {"init": args.init, "optimizer": args.optimizer, "lr": args.lr or LRS[(args.init, args.optimizer)],
               "clip": args.clip, "epochs": args.epochs, "steps": session.tau, "clipped_steps": clipped,
               "forget_authors": authors, "forget_ids": ids, "steps_touched": result.info.get("steps_touched"),
               "method": args.method, "method_args": kw, "n_params": sum(p.numel() for p in oracle.values()),
               "fidelity": fidelity, "timings": timings, **sweep,
               "command": "python benchmarks/certify.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                   if k not in ("overrides", "json", "png") and v is not None)}
    print(format_table(certification_table(out), CERTIFICATION_COLUMNS))
    for r in out["rows"]:
        if "skipped" in r:
            print(f"{r['variant']}: {r['skipped']}")
    print("references:", json.dumps(out["references"], default=str))
    print(f"init={args.init} optimizer={args.optimizer} steps={out['steps']} n={out['n_params']} "
          f"forget={len(ids)} rows; residual {fidelity['residual']:.4g} (rel {fidelity['rel_param_error']:.3g}); "
          f"target reached at: {out['reached_at']}; timings {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(out, indent=2, default=str))
    tmp_path.replace(path)
    png = plot_certification(out, args.png)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
