"""The fine-tuning baselines on a finished ``lmcleaner demo`` run, at several learning rates.

    lmcleaner demo demo.out_dir=demo_out
    python benchmarks/baselines.py --demo demo_out --lrs default,1,0.1 --json bench_out/baselines.json

GradAscent, GradDiff, NPO and SimNPO run at their defaults (``default``:
open-unlearning's TOFU settings, lr 1e-5) and at multiples of the run's own
learning rate (``lr_relative=true``; 1 is the papers' ratio of unlearning to
fine-tuning rate), each measured against the demo's exact-retrain oracle with
the demo's columns: rel_param_error, next-token KL to the oracle on forget and
retain rows, gradient-equivalents and cost vs exact replay, and (unless
``--no-eval``) forget quality, model utility and MIA AUC on the embedded
evaluation data. Prints the table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmcleaner.evaluate import EvalData, evaluate_models, format_table
from lmcleaner.evaluate.compare import baseline_grid, compare_methods, merge_eval
from lmcleaner.train.export import export_model
from lmcleaner.unlearn.session import UnlearnSession

COLUMNS = ["name", "rel_param_error", "kl_forget", "kl_retain", "grad_equivalents", "cost_vs_replay", "seconds",
           "forget_quality", "model_utility", "mia_auc"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a finished `lmcleaner demo` output directory (demo.out_dir)")
    ap.add_argument("--lrs", default="default,1,0.1",
                    help="'default' and/or multiples of the run's learning rate, comma-separated")
    ap.add_argument("--max-retain", type=int, default=48, help="retain rows for KL (the demo's eval_max_retain)")
    ap.add_argument("--max-holdout", type=int, default=32, help="holdout rows for MIA (the demo's eval_max_holdout)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--no-eval", action="store_true", help="parameter/KL/cost columns only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="bench_out/baselines.json")
    args = ap.parse_args(argv)
    demo = Path(args.demo)
    if not (demo / "results.json").is_file() or not (demo / "retrain" / "final_model").is_dir():
        print(f"benchmarks/baselines.py: {demo} is not a finished demo output (results.json, retrain/final_model): "
              "run `lmcleaner demo demo.out_dir=...` first", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    ids = json.loads((demo / "results.json").read_text())["forget_ids"]
    session = UnlearnSession(demo / "run")
    theta = session.replayer.state_at(session.tau)[0]
    oracle = {n: t for n, t in load_file(str(demo / "retrain" / "final_model" / "model.safetensors")).items()
              if n in theta}
    ds = session.trainer.dataset
    retain = [i for i in range(len(ds)) if i not in set(ids)][: args.max_retain]
    grid = [("replay", {})]
    for lr in (x.strip() for x in args.lrs.split(",") if x.strip()):
        grid += baseline_grid() if lr == "default" else baseline_grid(lr=float(lr), lr_relative=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dirs = {"original": str(demo / "run" / "final_model"), "oracle": str(demo / "retrain" / "final_model")}

        def export(name, res):
            if not args.no_eval:
                model_dirs[name] = str(export_model(session.model_with(res.params), session.trainer.tokenizer,
                                                    Path(tmp) / name))

        t0 = time.perf_counter()
        rows = compare_methods(session, ids, grid, oracle, [ds[i] for i in ids], [ds[i] for i in retain],
                               on_result=export, progress=False, include_original=True)
        seconds = time.perf_counter() - t0
        if not args.no_eval:
            data = EvalData.embedded(forget_ids=ids, max_retain=args.max_retain, max_holdout=args.max_holdout)
            _, summary = evaluate_models(model_dirs, data, oracle="oracle", original="original",
                                         out_dir=Path(tmp) / "eval", max_new_tokens=args.max_new_tokens,
                                         progress=False)
            merge_eval(rows, summary)
    print(format_table(rows, [c for c in COLUMNS if any(c in r for r in rows)]))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"demo": str(demo), "forget_ids": ids, "tau": session.tau, "grid": grid,
                               "unlearn_seconds": seconds, "rows": rows}, indent=2, default=str))
    print(f"\njson: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
