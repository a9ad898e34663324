"""Old requests answered together: what one joint computation costs per request.

Trains one run of ``benchmarks/fidelity.py``'s regimes (default: ``old``,
pretrained base, AdamW, 300 steps) and takes ``max(--ks)`` single-sample
requests, each sample used once in consecutive batches from 5% of the run on.
For each ``k`` in ``--ks`` the first ``k`` requests are answered *jointly*
(``lmcleaner unlearn unlearn.requests=FILE`` does the same: one computation on
the union, one audit record per request) by ``replay`` and by ``auto``, and
compared with exact retraining without all ``k`` samples (the joint oracle):
parameter error, KL ratio on the forgotten rows, and the cost *per request*
— the joint gradient-equivalents (and wall time) divided by ``k`` — as a
ratio to what replay costs for *one* request (``k = 1``, same run).

    python benchmarks/batched.py --seed 17 --ks 1,4,10 --json bench_out/batched_s17.json

Exact replay's cost is set by the earliest use (``tau`` minus the restore
point before it), not by the number of samples, so ``k`` requests cost about
one replay: ``1/k`` each. This is amortisation, not a cheaper method: a
single old request still costs what ``docs/unlearning.md`` reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # the regimes are defined there

from lmcleaner.config import load_config
from lmcleaner.evaluate import format_table
from lmcleaner.evaluate.compare import compare_methods
from lmcleaner.train import Trainer
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.session import UnlearnSession


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fidelity.add_regime_args(ap)
    ap.add_argument("--ks", default="1,4,10", help="numbers of requests answered together (comma list)")
    ap.add_argument("--methods", default="replay,auto", help="methods run on each joint set (comma list)")
    ap.add_argument("--json", default="bench_out/batched.json")
    args = fidelity.parse_regime_args(ap)
    ks = sorted({int(k) for k in args.ks.split(",") if k})
    if not ks or ks[0] != 1:
        ap.error(f"--ks {args.ks!r}: give numbers of requests starting with 1 (the ratios are to one "
                 "request's replay), e.g. 1,4,10")
    args.forget = ks[-1]  # pick_forget: one sample from each of that many consecutive batches
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        overrides, _, _ = fidelity.regime_config(args, run_dir)
        trainer = Trainer(load_config(overrides=overrides))
        trainer.train()
        requests = fidelity.pick_forget(trainer, args)  # sorted ids, one per request
        session = UnlearnSession(run_dir)
        ds = trainer.dataset
        holdout = fidelity.build_holdout(trainer, 40)
        single = None  # replay's cost for one request (k = 1): gradient-equivalents, seconds
        for k in ks:
            ids = requests[:k]
            t0 = time.perf_counter()
            oracle_trainer = Trainer(retrain_config(run_dir, ids, Path(tmp) / f"retrain{k}"))
            oracle_trainer.train()
            retrain_seconds = time.perf_counter() - t0
            oracle = {n: p.detach().clone() for n, p in oracle_trainer.engine.trainable().items()}
            forget = set(ids)
            retain = [ds[i] for i in range(len(ds)) if i not in forget][:32]
            grid = [(m, {}) for m in args.methods.split(",") if m]
            if "replay" not in [m for m, _ in grid]:
                grid.insert(0, ("replay", {}))
            result = compare_methods(session, ids, grid, oracle, [ds[i] for i in ids], retain,
                                     holdout_items=holdout, progress=False)
            for r in result:
                if k == 1 and r["name"] == "replay":
                    single = (r["grad_equivalents"], r["seconds"])
                rows.append({"k": k, "method": r["name"], "chosen": r.get("chosen"), "uses": r.get("steps_touched"),
                             "rel_param_error": r.get("rel_param_error"), "kl_forget_ratio": r.get("kl_forget_ratio"),
                             "grad_equivalents": r["grad_equivalents"], "per_request": r["grad_equivalents"] / k,
                             "seconds": r["seconds"], "retrain_seconds": retrain_seconds})
    for r in rows:
        r["per_request_vs_single_replay"] = r["per_request"] / single[0]
        r["wall_per_request_vs_single_replay"] = (r["seconds"] / r["k"]) / single[1] if single[1] else None
    print(format_table(rows, columns=["k", "method", "chosen", "uses", "rel_param_error", "kl_forget_ratio",
                                      "grad_equivalents", "per_request_vs_single_replay",
                                      "wall_per_request_vs_single_replay"]))
    print(f"regime={args.regime} init={args.init} optimizer={args.optimizer} clip={args.clip} seed={args.seed} "
          f"steps={args.steps} requests (one sample each)={requests}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "overrides"},
                                "requests": requests, "rows": rows}, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
