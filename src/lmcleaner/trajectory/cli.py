"""``lmcleaner inspect LOG_DIR``: what a training log holds, for people and scripts.

Why in this package: the CLI owner only has to call ``register(subparsers)``
and dispatch to ``run(args)``; the knowledge of the format stays here.
``python -m lmcleaner.trajectory.cli LOG_DIR`` works on its own too.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .jsonl import TrajectoryLogError

HELP = "show what a training log holds (steps, window, mode, bytes per step, checkpoints, sample uses)"
DESCRIPTION = """\
Open a training-trajectory log (the directory written by training_logger,
default <output_dir>/training_log), validate it and print a summary:
recorded steps, the replayable window, storage mode, bytes per step (log
files only; checkpoints are listed separately), restore points, online
deletion events and the state of the tail (torn / not closed).

Exit status: 0 ok, 2 the log is invalid (one line naming the file and the
last valid step) or bad usage. A corrupted (not merely torn) file is named
as such; --tolerant says which intact steps it leaves out."""

EPILOG = """\
examples:
  lmcleaner inspect outputs/run/training_log
  lmcleaner inspect outputs/run/training_log --sample 17
  lmcleaner inspect outputs/run/training_log --json | jq .bytes_per_step
  lmcleaner inspect outputs/run/training_log --tolerant   # after a crash: use the valid prefix"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("inspect", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("log_dir", metavar="LOG_DIR", help="training log directory (holds meta.json, steps.jsonl)")
    p.add_argument("--sample", type=int, action="append", metavar="ID",
                   help="list the steps, micro-batches and rows where sample ID was trained on (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--tolerant", action="store_true",
                   help="open a damaged log anyway: use the valid prefix and report the torn tail")


def summary(log, samples: list[int] | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as a JSON-able dict."""
    sizes = log.sizes()
    lo, hi = log.window
    out: dict[str, Any] = {
        "log_dir": str(log.log_dir),
        "format_version": log.meta.get("format_version"),
        "storage": log.storage,
        "mode": log.mode,
        "run_fingerprint": log.run_fingerprint,
        "dataset_fingerprint": log.meta.get("dataset_fingerprint"),
        "model_fingerprint": log.meta.get("model_fingerprint"),
        "optimizer": log.meta.get("optimizer_type"),
        "steps": len(log),
        "first_step": log.first_step,
        "last_step": log.last_step,
        "window": {"configured": log.meta.get("window"), "replayable": [lo, hi]},
        "bytes_per_step": sizes["bytes_per_step"],
        "log_bytes": sizes["log_bytes"],
        "files": sizes["per_step_files"],
        "restore_points": [{"step": p.step, "kind": p.kind, "path": str(p.path),
                            "bytes": sizes["restore_points"].get(p.step, {}).get("bytes")}
                           for p in log.restore_points],
        "restore_point_bytes": sizes["restore_point_bytes"],
        "events": log.events,
        "diag_estimator": log.meta.get("diag_estimator"),
        "updates_exact": log.meta.get("updates_exact"),
        "tail": log.tail.to_json(),
    }
    if samples:
        out["samples"] = {str(i): [{"step": u.step, "micro_batch": u.micro_batch, "position": u.position}
                                   for u in log.sample_uses(i)] for i in samples}
    return out


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def format_text(s: dict[str, Any]) -> str:
    lo, hi = s["window"]["replayable"]
    steps = f"{s['first_step']}..{s['last_step']} ({s['steps']} steps)" if s["steps"] else "none"
    rps = s["restore_points"]
    lines = [
        f"log:            {s['log_dir']} (format {s['format_version']})",
        f"storage/mode:   {s['storage']} / {s['mode']}"
        + (f"  (diagonal: {s['diag_estimator']})" if s["diag_estimator"] else ""),
        f"run:            {s['run_fingerprint']}  data {s['dataset_fingerprint']}  model {s['model_fingerprint']}"
        f"  optimizer {s['optimizer']}",
        f"steps:          {steps}",
        f"window:         configured {s['window']['configured']} steps; replayable {lo}..{hi - 1}"
        if hi > lo else f"window:         configured {s['window']['configured']} steps; nothing replayable",
        f"bytes/step:     {s['bytes_per_step']:.0f} B (log files {_human(s['log_bytes'])}: "
        + ", ".join(f"{k} {_human(v)}" for k, v in s["files"].items() if v) + ")",
        f"checkpoints:    {len(rps)} ({_human(s['restore_point_bytes'])}): "
        + (", ".join(f"{p['step']}" + ("*" if p["kind"] == "anchor" else "") for p in rps) or "none")
        + ("  (* = post-deletion anchor)" if any(p["kind"] == "anchor" for p in rps) else ""),
        f"events:         {len(s['events'])} online deletion request(s)"
        + "".join(f"\n                step {e.get('step')}: {e.get('request_id')} ids {e.get('ids')}"
                  for e in s["events"]),
        f"tail:           {_tail_text(s['tail'])}",
    ]
    for sid, uses in (s.get("samples") or {}).items():
        if not uses:
            lines.append(f"{'sample ' + sid + ':':<16}not used in the recorded steps")
            continue
        lines.append(f"{'sample ' + sid + ':':<16}used {len(uses)} time(s)")
        lines += [f"  step {u['step']:>6}  micro-batch {u['micro_batch']:>3}  row {u['position']:>3}" for u in uses]
    return "\n".join(lines)


def _tail_text(t: dict[str, Any]) -> str:
    if not t["problems"]:
        return "clean, closed" if t["closed"] else "clean, not closed (live run, or killed between flushes)"
    probs = "; ".join(f"{p['file']}: {p['message']}" for p in t["problems"])
    state = "CORRUPTED (not a crash's torn tail)" if t.get("corrupt") else "TORN"
    return f"{state} after step {t['last_valid_step']}: {probs}"


def run(args: argparse.Namespace) -> int:
    """Execute ``inspect``; returns the exit status."""
    from .reader import TrajectoryLog

    try:
        log = TrajectoryLog(args.log_dir, tolerant=args.tolerant)
        s = summary(log, args.sample)
    except TrajectoryLogError as err:
        if args.json:
            print(json.dumps({"error": str(err)}))
        else:
            print(f"lmcleaner inspect: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=2) if args.json else format_text(s))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmcleaner inspect", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
