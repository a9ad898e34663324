#!/usr/bin/env python
"""Experiment sweep: unlearning fidelity and cost over optimizers, seeds,
forget splits, curvature (HVP) modes and propagation windows K.

For every optimizer x seed the embedded model is trained once with the
trajectory recorder (the training run does not depend on what is forgotten,
so the forget splits share it). For every forget split k (forget the first k
authors of the embedded fictitious-author data, i.e. all rows whose
``author_index`` < k) the exact-retrain oracle is computed once, and every
method of the grid is run and measured against it with
``lmcleaner.evaluate.compare.compare_methods``:

  replay (exact, error 0 by construction, the cost reference),
  LMCleaner sample level: each --modes x each --Ks (``full`` = the whole window),
  LMCleaner batch level (first mode, full window; a different counterfactual:
      whole batches removed, so its error against the sample-level oracle is
      not a fidelity figure),
  baselines: rollback (no propagation), sgd_formula (optimizer ignored), and
      the fine-tuning baselines GradAscent, GradDiff, NPO, SimNPO at their
      defaults (``compare.baseline_grid``).

Outputs in --out: ``sweep.csv`` and ``sweep.json`` (one row per method run:
optimizer, seed, split, method, hessian_mode, K, rel_param_error, kl_forget,
kl_retain, seconds, grad_equivalents, cost_vs_replay, ...) and ``sweep.png``
(relative parameter error against cost relative to exact replay, one panel per
optimizer, log x). The combined table is printed at the end.

This is a plain script, not a Hydra multirun: the sweep axes are flags and any
other ``key=value`` argument is passed to the training config (Hydra grammar,
e.g. ``training.batch_size=4 training.max_grad_norm=0``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EPILOG = """\
examples:
  python scripts/sweep.py --out sweep_out                      # defaults, ~2-3 min on 2 CPU cores
  python scripts/sweep.py --out sweep_out --Ks 5,10,20,full --modes exact,GGN --splits 1,2,4 \\
      --optimizers adamw,sgd --seeds 0,1,2 --steps 80
  python scripts/sweep.py --out sweep_out --model tiny-llama training.batch_size=4 training.max_grad_norm=0

learning rates: adamw 3e-3, sgd --sgd-lr (default 0.05); a training.learning_rate=... override
applies to every optimizer. Overrides of training.output_dir / resume_from_checkpoint are ignored."""

# One CSV column per field, in this order (extra keys are appended).
COLUMNS = ["optimizer", "seed", "split", "forget_authors", "n_forget", "name", "method", "hessian_mode", "K",
           "K_label", "rel_param_error", "kl_forget", "kl_retain", "seconds", "grad_equivalents", "cost_vs_replay",
           "replay_seconds", "recovery_steps", "steps_touched", "first_step", "tau"]
TABLE_COLUMNS = ["optimizer", "seed", "split", "name", "K_label", "rel_param_error", "kl_forget", "kl_retain",
                 "seconds", "grad_equivalents", "cost_vs_replay"]
DEFAULT_LR = {"adamw": 3e-3, "sgd": 0.05}
ROWS_PER_AUTHOR = 8  # embedded data: 8 question/answer rows per author


# --------------------------------------------------------------------------- arguments
def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _k_list(text: str) -> list[str]:
    out = []
    for x in _csv_list(text):
        if x.lower() in ("full", "tau", "all"):
            out.append("full")
        elif x.isdigit() and int(x) > 0:
            out.append(str(int(x)))
        else:
            raise argparse.ArgumentTypeError(f"bad K '{x}': use positive integers or 'full'")
    if not out:
        raise argparse.ArgumentTypeError("give at least one K")
    return out


def _modes(text: str) -> list[str]:
    modes = _csv_list(text)
    bad = [m for m in modes if m not in ("exact", "GGN", "diag")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"bad hessian modes {bad or text!r}: choose from exact, GGN, diag")
    return modes


def _optimizers(text: str) -> list[str]:
    opts = _csv_list(text)
    bad = [o for o in opts if o not in DEFAULT_LR]
    if bad or not opts:
        raise argparse.ArgumentTypeError(f"bad optimizers {bad or text!r}: choose from {sorted(DEFAULT_LR)}")
    return opts


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sweep.py", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (sweep.csv, sweep.json, sweep.png)")
    ap.add_argument("--Ks", type=_k_list, default=_k_list("5,20,full"),
                    help="propagation windows K of LMCleaner sample level, 'full' = the whole recorded "
                         "window (default: 5,20,full); K >= tau counts as full")
    ap.add_argument("--modes", type=_modes, default=_modes("exact,GGN"),
                    help="HVP / curvature modes: exact, GGN, diag (diag records a diagonal: slower training) "
                         "(default: exact,GGN)")
    ap.add_argument("--splits", type=_int_list, default=[1, 2],
                    help="forget splits: k = forget the first k authors (8 rows each) (default: 1,2)")
    ap.add_argument("--optimizers", type=_optimizers, default=["adamw", "sgd"],
                    help="training optimizers (default: adamw,sgd)")
    ap.add_argument("--seeds", type=_int_list, default=[0], help="training seeds (default: 0)")
    ap.add_argument("--steps", type=int, default=40,
                    help="training steps, all recorded (default: 40 = one epoch of the 320 rows at batch 8)")
    ap.add_argument("--model", default="micro-llama", help="model preset or YAML (default: micro-llama)")
    ap.add_argument("--data", default="embedded", help="embedded or embedded:<authors> (default: embedded)")
    ap.add_argument("--sgd-lr", type=float, default=DEFAULT_LR["sgd"], help="sgd learning rate (default: 0.05)")
    ap.add_argument("--checkpoint-interval", type=int, default=None,
                    help="light-mode checkpoint spacing C (default: max(5, steps // 10))")
    ap.add_argument("--no-baselines", action="store_true",
                    help="skip rollback, sgd_formula and the fine-tuning baselines")
    ap.add_argument("--no-batch-level", action="store_true", help="skip LMCleaner batch level")
    ap.add_argument("--eval-retain", type=int, default=32, help="retain samples for kl_retain (default: 32)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default: 1, fastest for these tiny models on 2 cores)")
    ap.add_argument("--keep-runs", action="store_true", help="keep the trained runs and oracles under OUT/runs")
    ap.add_argument("--no-plot", action="store_true", help="do not draw sweep.png")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--train-progress", action="store_true", help="also show the per-step training progress bars")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="training config overrides (Hydra grammar), e.g. training.batch_size=4")
    return ap


# --------------------------------------------------------------------------- grid
def resolve_Ks(Ks: Sequence[str | int], tau: int) -> list[int]:
    """Integer windows, 'full' -> tau; K >= tau is the full window; sorted, unique."""
    out = set()
    for k in Ks:
        k = str(k)
        out.add(tau if k == "full" else min(int(k), tau))
    return sorted(out)


def build_grid(tau: int, Ks: Sequence[str | int], modes: Sequence[str], baselines: bool = True,
               batch_level: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """(method, kwargs) pairs, in the order of ``default_grid``."""
    grid: list[tuple[str, dict[str, Any]]] = [("replay", {})]
    for mode in modes:
        for K in resolve_Ks(Ks, tau):
            grid.append(("LMCleanerSampleLevel", {"hessian_mode": mode, "K": K}))
    if batch_level:
        grid.append(("LMCleanerBatchLevel", {"hessian_mode": modes[0], "K": tau}))
    if baselines:
        from lmcleaner.evaluate.compare import baseline_grid

        grid += [("rollback", {}), ("sgd_formula", {"hessian_mode": modes[0], "K": tau}), *baseline_grid()]
    return grid


def forget_ids_for_split(records: list[dict], k: int) -> list[int]:
    """Sample ids of the first ``k`` authors (rows with ``author_index < k``)."""
    if not records or "author_index" not in records[0]:
        raise ValueError("forget splits need the embedded data (rows with 'author_index')")
    n_authors = len({r["author_index"] for r in records})
    if not 1 <= k <= n_authors:
        raise ValueError(f"split {k}: choose 1..{n_authors} authors")
    return [i for i, r in enumerate(records) if int(r["author_index"]) < k]


# --------------------------------------------------------------------------- training
def training_overrides(args, optimizer: str, seed: int, run_dir: Path) -> list[str]:
    lr = DEFAULT_LR["adamw"] if optimizer == "adamw" else args.sgd_lr
    ci = args.checkpoint_interval or max(5, args.steps // 10)
    show = args.train_progress and not args.no_progress
    base = [f"model={args.model}", f"training.dataset_name={args.data}", f"training.optimizer={optimizer}",
            f"training.learning_rate={lr}", f"training.seed={seed}", f"training.max_steps={args.steps}",
            f"training.progress_bar={str(show).lower()}", "training.logging_steps=0",
            "training_logger.enabled=true", f"training_logger.max_steps={args.steps}",
            f"training_logger.checkpoint_interval={ci}"]
    if "diag" in args.modes:
        base.append("training_logger.storage=diag")
    # user overrides win, except where the run goes
    user = [o for o in args.overrides if not o.lstrip("+").startswith(("training.output_dir=",
                                                                       "training.resume_from_checkpoint="))]
    return base + user + [f"training.output_dir={run_dir}", "training.resume_from_checkpoint=null"]


def _used_ids(trainer, ids: list[int], steps: int) -> list[int]:
    """The ids among ``ids`` that appear in one of the first ``steps`` batches."""
    wanted = set(ids)
    seen = {i for s in range(steps) for mb in trainer.plan.micro_batches(s) for i in mb if i in wanted}
    return sorted(seen)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


# --------------------------------------------------------------------------- outputs
def write_csv(rows: list[dict], path: Path) -> Path:
    extra = [k for r in rows for k in r if k not in COLUMNS]
    columns = COLUMNS + list(dict.fromkeys(extra))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    tmp.replace(path)
    return path


def write_json(obj: Any, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str, allow_nan=False) if _json_safe(obj)
                   else json.dumps(_nan_to_none(obj), indent=2, default=str))
    tmp.replace(path)
    return path


def _json_safe(obj: Any) -> bool:
    try:
        json.dumps(obj, default=str, allow_nan=False)
        return True
    except ValueError:
        return False


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


METHOD_LABELS = {"LMCleanerSampleLevel": "LMCleaner sample", "LMCleanerBatchLevel": "LMCleaner batch"}
SPLIT_MARKERS = "osD^vP*X"


def plot_sweep(rows: list[dict], path: Path) -> Path | None:
    """Error vs cost_vs_replay, one panel per optimizer, one colour per method
    (LMCleaner sample level: one colour per hessian mode), one marker per split,
    log x; seeds are separate points. Error axis: symlog (replay's 0 stays visible)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    pts = [r for r in rows if _finite(r.get("rel_param_error")) and _finite(r.get("cost_vs_replay"))
           and float(r["cost_vs_replay"]) > 0]
    if not pts:
        return None
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    splits = sorted({r["split"] for r in rows})

    def series(r: dict) -> str:
        label = METHOD_LABELS.get(r["method"], r["method"])
        return f"{label} ({r['hessian_mode']})" if r["method"] == "LMCleanerSampleLevel" else label

    labels = list(dict.fromkeys(series(r) for r in pts))
    colour = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    fig = Figure(figsize=(5.2 * len(optimizers) + 2.4, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(optimizers), squeeze=False, sharey=True)[0]
    ymax = max(float(r["rel_param_error"]) for r in pts)
    for ax, opt in zip(axes, optimizers):
        mine = [r for r in pts if r["optimizer"] == opt]
        for lab in labels:
            for si, split in enumerate(splits):
                sel = [r for r in mine if series(r) == lab and r["split"] == split]
                if not sel:
                    continue
                ax.scatter([float(r["cost_vs_replay"]) for r in sel], [float(r["rel_param_error"]) for r in sel],
                           s=34, color=colour[lab], marker=SPLIT_MARKERS[si % len(SPLIT_MARKERS)], alpha=0.85,
                           edgecolors="black", linewidths=0.4, zorder=3)
        # K labels on the LMCleaner sample-level points (first seed only, to stay readable)
        seed0 = min(r["seed"] for r in mine) if mine else None
        for r in mine:
            if r["method"] == "LMCleanerSampleLevel" and r["seed"] == seed0:
                ax.annotate(f"K={r['K_label']}", (float(r["cost_vs_replay"]), float(r["rel_param_error"])),
                            textcoords="offset points", xytext=(4, 3), fontsize=6.5, color="0.25")
        ax.axvline(1.0, color="0.5", linestyle=":", linewidth=1.0)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("symlog", linthresh=0.02, linscale=0.6)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylim(-0.005, max(1.5, ymax * 1.6))
        ax.set_title(f"optimizer: {opt}")
        ax.set_xlabel("cost / exact replay (gradient equivalents, log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("relative parameter error to oracle (symlog)")
    handles = [Line2D([], [], linestyle="", marker="o", color=colour[lab], markeredgecolor="black",
                      markeredgewidth=0.4, label=lab) for lab in labels]
    if len(splits) > 1:
        handles += [Line2D([], [], linestyle="", marker=SPLIT_MARKERS[i % len(SPLIT_MARKERS)], color="0.6",
                           markeredgecolor="black", markeredgewidth=0.4, label=f"split {s} (authors)")
                    for i, s in enumerate(splits)]
    fig.legend(handles=handles, loc="center right", fontsize="small", frameon=True)
    fig.suptitle("Unlearning error vs cost (exact replay: error 0, cost 1)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / (5.2 * len(optimizers) + 2.4), 1))
    fig.savefig(str(path))
    return path


# --------------------------------------------------------------------------- the sweep
def run_sweep(args) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from lmcleaner.config import load_config
    from lmcleaner.evaluate.compare import compare_methods
    from lmcleaner.train import Trainer
    from lmcleaner.unlearn.cli_retrain import retrain_config
    from lmcleaner.unlearn.session import UnlearnSession

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_root = out / "runs"
    progress = not args.no_progress
    combos = [(o, s) for o in args.optimizers for s in args.seeds]
    rows: list[dict] = []
    runs: list[dict] = []
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    try:
        bar = tqdm(total=len(combos) * len(args.splits), desc="sweep", disable=not progress, position=0)
        for optimizer, seed in combos:
            tag = f"{optimizer}-seed{seed}"
            run_dir = runs_root / tag / "run"
            if run_dir.parent.exists():
                shutil.rmtree(run_dir.parent)
            bar.set_postfix_str(f"{tag}: train")
            cfg = load_config(overrides=training_overrides(args, optimizer, seed, run_dir))
            t0 = time.perf_counter()
            trainer = Trainer(cfg)
            state = trainer.train()
            train_seconds = time.perf_counter() - t0
            records = trainer.dataset.records
            session = UnlearnSession(run_dir)
            tau = session.tau
            for split in args.splits:
                ids = forget_ids_for_split(records, split)
                used = _used_ids(trainer, ids, tau)
                if len(used) < len(ids):
                    tqdm.write(f"warning: {tag} split {split}: {len(ids) - len(used)} of the {len(ids)} samples of "
                               f"the first {split} author(s) are never used in the {tau} recorded steps "
                               "(nothing to forget for them): forgetting the other ones. Raise --steps or lower "
                               "training.num_samples to use them all.")
                if not used:
                    raise SystemExit(f"split {split}: no sample of the first {split} author(s) is used in training")
                ids = used
                bar.set_postfix_str(f"{tag} split {split}: oracle")
                t0 = time.perf_counter()
                oracle_trainer = Trainer(retrain_config(run_dir, ids, run_dir.parent / f"retrain-split{split}"),
                                         tokenizer=trainer.tokenizer)
                oracle_trainer.train()
                retrain_seconds = time.perf_counter() - t0
                oracle = {n: p.detach().clone() for n, p in oracle_trainer.engine.trainable().items()}
                del oracle_trainer
                ds = trainer.dataset
                forget_set = set(ids)
                retain_ids = [i for i in range(len(ds)) if i not in forget_set][: args.eval_retain]
                grid = build_grid(tau, args.Ks, args.modes, baselines=not args.no_baselines,
                                  batch_level=not args.no_batch_level)
                bar.set_postfix_str(f"{tag} split {split}: {len(grid)} methods")
                t0 = time.perf_counter()
                res_rows = compare_methods(session, ids, grid, oracle, [ds[i] for i in ids],
                                           [ds[i] for i in retain_ids], progress=progress)
                unlearn_seconds = time.perf_counter() - t0
                touched = session.steps_for(ids)
                for r in res_rows:
                    K = r.get("K")
                    rows.append({
                        "optimizer": optimizer, "seed": seed, "split": split,
                        "forget_authors": f"0-{split - 1}" if split > 1 else "0", "n_forget": len(ids),
                        **r, "K_label": None if K is None else ("full" if K >= tau else str(K)),
                        "first_step": touched[0], "tau": tau,
                    })
                runs.append({"optimizer": optimizer, "seed": seed, "split": split, "forget_ids": ids,
                             "steps_touched": touched, "tau": tau, "train_seconds": train_seconds,
                             "retrain_seconds": retrain_seconds, "unlearn_seconds": unlearn_seconds,
                             "final_train_loss": state.history[-1]["loss"] if state.history else None,
                             "params": sum(p.numel() for p in oracle.values())})
                bar.update(1)
            del session, trainer
            if not args.keep_runs:
                shutil.rmtree(run_dir.parent, ignore_errors=True)
        bar.close()
    finally:
        torch.set_num_threads(threads_before)
    if not args.keep_runs and runs_root.exists() and not any(runs_root.iterdir()):
        runs_root.rmdir()

    meta = {"optimizers": args.optimizers, "seeds": args.seeds, "splits": args.splits, "Ks": args.Ks,
            "modes": args.modes, "steps": args.steps, "model": args.model, "data": args.data,
            "overrides": args.overrides, "threads": args.threads,
            "total_seconds": time.perf_counter() - t_start, "command": " ".join(sys.argv)}
    paths = {"csv": write_csv(rows, out / "sweep.csv"),
             "json": write_json({"meta": meta, "runs": runs, "rows": rows}, out / "sweep.json")}
    if not args.no_plot:
        png = plot_sweep(rows, out / "sweep.png")
        if png is not None:
            paths["png"] = png
    return {"rows": rows, "runs": runs, "meta": meta, "paths": paths}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweep; returns ``{"rows", "runs", "meta", "paths"}`` (used by the tests)."""
    from lmcleaner.evaluate import format_table

    args = build_parser().parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2")
    result = run_sweep(args)
    print(format_table(result["rows"], columns=TABLE_COLUMNS))
    for r in result["runs"]:
        print(f"{r['optimizer']} seed {r['seed']} split {r['split']}: forgot {len(r['forget_ids'])} samples used in "
              f"{len(r['steps_touched'])} of {r['tau']} steps (first at step {r['steps_touched'][0]}); "
              f"train {r['train_seconds']:.1f}s, retrain {r['retrain_seconds']:.1f}s, "
              f"all methods {r['unlearn_seconds']:.1f}s")
    print(f"total {result['meta']['total_seconds']:.1f}s; wrote " + ", ".join(str(p) for p in result["paths"].values()))
    return result


if __name__ == "__main__":
    main()
