"""Unlearning a mixture of experts: LMCleaner with and without the router losses in its step loss.

A tiny Mixtral (1 layer, hidden 16, 4 experts, top-2) trained for 10 steps
(batch 4, accumulation 2) with load-balance 0.5, balance-deviation 0.5 and
z-loss 0.01; for each forget set, the exact retrain (the oracle, equal to
replay bit for bit) and LMCleanerSampleLevel (exact HVP, full window) twice:
with the router term in injection and curvature (what unlearning does), and
with the NLL only (what it did before). Relative parameter error
``||theta_hat - theta_retrain|| / ||theta - theta_retrain||`` (1 = doing nothing),
next to the method's own ``estimated_error`` (``unlearn.handlers._correction``).

    python benchmarks/moe.py --json bench_out/moe.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from lmcleaner.config import load_config
from lmcleaner.train import Trainer
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.session import UnlearnSession

BASE = ["model=tiny-mixtral", "training.num_samples=32", "training.batch_size=4",
        "training.gradient_accumulation_steps=2", "training.max_steps=10", "training.progress_bar=false",
        "training.logging_steps=0", "training.torch_threads=1", "training.load_balance_coef=0.5",
        "training.auxiliary_coef=0.5", "training.z_loss_coef=0.01", "training_logger.checkpoint_interval=4"]
RUNS = {"SGD lr 3e-2": ["training.optimizer=sgd", "training.learning_rate=3e-2", "training.max_grad_norm=0"],
        "AdamW lr 3e-3": ["training.optimizer=adamw", "training.learning_rate=3e-3"],
        "AdamW lr 3e-4": ["training.optimizer=adamw", "training.learning_rate=3e-4"]}
FORGET_SETS = [[5], [9], [3, 17], [1, 2, 4]]


def rel(params, theta, oracle) -> float:
    num = sum(((params[n].double() - oracle[n].double()) ** 2).sum() for n in oracle)
    return float((num / sum(((theta[n].double() - oracle[n].double()) ** 2).sum() for n in oracle)).sqrt())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, extra) in enumerate(RUNS.items()):
            root = Path(tmp) / str(k)
            Trainer(load_config(overrides=[*BASE, *extra, f"training.output_dir={root / 'run'}"])).train()
            s = UnlearnSession(root / "run")
            theta = s.replayer.state_at(s.tau)[0]
            for j, forget in enumerate(FORGET_SETS):
                oracle_trainer = Trainer(retrain_config(root / "run", forget, root / f"retrain{j}"))
                oracle_trainer.train()
                oracle = {n: p.detach().clone() for n, p in oracle_trainer.engine.trainable().items()}
                res = s.run("LMCleanerSampleLevel", forget, hessian_mode="exact")
                with_router = rel(res.params, theta, oracle)
                router, s.router_aux = s.router_aux, None
                nll_only = rel(s.run("LMCleanerSampleLevel", forget, hessian_mode="exact").params, theta, oracle)
                s.router_aux = router
                rows.append({"run": name, "forget": forget, "with_router_losses": with_router, "nll_only": nll_only,
                             "estimated_error": res.info.get("estimated_error"),
                             "diverged": bool(res.info.get("diverged"))})
    print("| run | forget | LMCleaner, router losses included | its estimated error | NLL only |\n"
          "|---|---|---:|---:|---:|")
    for r in rows:
        est = "-" if r["estimated_error"] is None else f"{r['estimated_error']:.3f}"
        print(f"| {r['run']} | {r['forget']} | {r['with_router_losses']:.3f} | {est} | {r['nll_only']:.3f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
