"""Cost of the trajectory recorder on the default model (DESIGN §4: bytes per step,
training throughput with and without the recorder).

1. Bytes per step of the log for each storage mode (light, heavy, diag): the
   log files only (steps.jsonl, sample_indices.jsonl, events.jsonl,
   batch_index.json, tensor shards); the trainer checkpoints the recorder
   keeps (light: theta_0 and every ``checkpoint_interval`` steps) are listed
   separately.
2. Throughput of training with the light recorder vs without it, as a ratio
   from runs of one invocation, interleaved (off, light@C..., then reversed)
   so that load drifting on a shared machine hits all sides alike; the ratio
   is of the median whole-``train()`` times. The light side includes
   everything the recorder causes: its hooks, the writer thread, the waits at
   checkpoints and the extra checkpoints it asks the trainer to write, which
   dominate; hence one ratio per checkpoint interval ``C`` (``--intervals``).

    python benchmarks/recorder.py --steps 200 --repeats 5 --json bench_out/recorder.json

Goals: light <= 1 KB/step, throughput ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmcleaner.config import load_config
from lmcleaner.train import Trainer
from lmcleaner.train.hooks import NullRecorder
from lmcleaner.trajectory import TrainingLogger, TrajectoryLog


class _Clock:
    """Time from the first step's start to the last step's end (the training loop)."""

    def _begin(self):
        if getattr(self, "t_first", None) is None:
            self.t_first = time.perf_counter()

    def _end(self):
        self.t_last = time.perf_counter()


class TimedNull(NullRecorder, _Clock):
    def on_step_begin(self, engine, step, micro_batches):
        self._begin()

    def on_step_end(self, engine, record, batches):
        self._end()


class TimedLogger(TrainingLogger, _Clock):
    def on_step_begin(self, engine, step, micro_batches):
        self._begin()
        super().on_step_begin(engine, step, micro_batches)

    def on_step_end(self, engine, record, batches):
        super().on_step_end(engine, record, batches)
        self._end()


def one_run(steps: int, storage: str | None, root: Path, overrides: list[str]) -> dict:
    """``storage``: None (recorder off), ``light``, ``heavy``, ``diag`` or ``diag:<estimator>``."""
    if storage and ":" in storage:
        storage, estimator = storage.split(":", 1)
        overrides = [*overrides, f"training_logger.diag_estimator={estimator}"]
    out = root / f"{storage or 'off'}-{time.monotonic_ns()}"
    cfg = load_config(overrides=[f"training.max_steps={steps}", "training.logging_steps=0",
                                 "training.progress_bar=false", f"training.output_dir={out}",
                                 f"training_logger.enabled={'true' if storage else 'false'}",
                                 *([f"training_logger.storage={storage}"] if storage else []), *overrides])
    rec = TimedLogger(cfg.training_logger, out / "training_log") if storage else TimedNull()
    trainer = Trainer(cfg, recorder=rec)
    ckpt_seconds = [0.0]
    real_save = trainer.save_checkpoint

    def timed_save(reason):
        t = time.perf_counter()
        try:
            return real_save(reason)
        finally:
            ckpt_seconds[0] += time.perf_counter() - t

    trainer.save_checkpoint = timed_save
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    res = {"storage": storage or "off", "steps": steps, "train_seconds": total,
           "loop_seconds": rec.t_last - rec.t_first, "steps_per_s": steps / total,
           "checkpoint_seconds": ckpt_seconds[0],
           "checkpoints_written": sum(len(v) > 0 for v in trainer.state.checkpoint_reasons.values())}
    if storage:
        log = TrajectoryLog(out / "training_log")
        sizes = log.sizes()
        res.update({"bytes_per_step": sizes["bytes_per_step"], "log_bytes": sizes["log_bytes"],
                    "files": sizes["per_step_files"], "fixed_files": sizes["fixed_files"],
                    "checkpoints_kept": {str(k): v["bytes"] for k, v in sizes["restore_points"].items()},
                    "checkpoint_bytes": sizes["restore_point_bytes"],
                    "recorder_main_thread": rec.stats.to_json(),
                    "writer": {"flushes": rec.writer.stats.flushes, "busy_seconds": rec.writer.stats.busy_seconds}})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (off, light@C...) for the ratio")
    ap.add_argument("--modes", default="light,heavy,diag,diag:empirical_fisher",
                    help="storage modes to size (diag:<estimator> picks the diagonal estimator)")
    ap.add_argument("--intervals", default="20,100",
                    help="checkpoint_interval values C for the throughput ratio (the first is the default)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 avoids OpenMP spin-waits on a shared machine; 0: torch default)")
    ap.add_argument("--json", default="bench_out/recorder.json")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. training.batch_size=16")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    intervals = [int(c) for c in args.intervals.split(",") if c]
    sides = ["off"] + [f"light@C={c}" for c in intervals]

    def run_side(side: str, root: Path) -> dict:
        if side == "off":
            return one_run(args.steps, None, root, args.overrides)
        c = side.split("=")[1]
        return one_run(args.steps, "light", root, [*args.overrides, f"training_logger.checkpoint_interval={c}"])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one_run(10, None, root, args.overrides)  # warm-up
        sizes = {m: one_run(args.steps, m, root, args.overrides) for m in args.modes.split(",") if m}
        rounds = []
        for k in range(args.repeats):
            order = sides if k % 2 == 0 else sides[::-1]
            rounds.append({s: run_side(s, root) for s in order})

    def med(side: str, key: str = "train_seconds") -> float:
        return statistics.median(r[side][key] for r in rounds)

    def best(side: str, key: str = "train_seconds") -> float:
        return min(r[side][key] for r in rounds)

    ratios = {}
    for side in sides[1:]:
        stats = [r[side]["recorder_main_thread"] for r in rounds]
        ratios[side] = {
            "ratio_median": med("off") / med(side),
            "ratio_best_of_runs": best("off") / best(side),
            "ratio_loop_only_median": med("off", "loop_seconds") / med(side, "loop_seconds"),
            "per_round": [r["off"]["train_seconds"] / r[side]["train_seconds"] for r in rounds],
            "steps_per_s": args.steps / med(side),
            "recorder_hook_us_per_step": statistics.median(s["hook_us_per_step"] for s in stats),
            "recorder_blocked_ms_total": 1e3 * statistics.median(s["blocked_seconds"] for s in stats),
            "checkpoint_seconds": med(side, "checkpoint_seconds"),
            "checkpoints_written": statistics.median(r[side]["checkpoints_written"] for r in rounds),
        }
    default = ratios[sides[1]] if len(sides) > 1 else {}
    result = {
        "steps": args.steps, "overrides": args.overrides, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_avg_end": os.getloadavg(),
        "bytes_per_step": {m: r["bytes_per_step"] for m, r in sizes.items()},
        "sizes": sizes,
        "throughput": {"off_steps_per_s": args.steps / med("off"),
                       "off_checkpoint_seconds": med("off", "checkpoint_seconds"),
                       "light": ratios, "rounds": rounds},
        "goals": {"light_bytes_per_step_le_1024": sizes.get("light", {}).get("bytes_per_step", 0) <= 1024,
                  f"throughput_ratio_ge_0.97_at_default_{sides[1] if len(sides) > 1 else ''}":
                      default.get("ratio_median", 0) >= 0.97},
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))

    print(f"default model, {args.steps} steps, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'mode':>22} {'B/step (log)':>13} {'log total':>10} {'ckpts kept':>11} {'ckpt bytes':>11} "
          f"{'steps/s':>8} {'hook us/step':>13}")
    for m, r in sizes.items():
        print(f"{m:>22} {r['bytes_per_step']:>13.0f} {r['log_bytes']:>10} {len(r['checkpoints_kept']):>11} "
              f"{r['checkpoint_bytes']:>11} {r['steps_per_s']:>8.1f} "
              f"{r['recorder_main_thread']['hook_us_per_step']:>13.0f}")
    print(f"throughput, off: {result['throughput']['off_steps_per_s']:.1f} steps/s "
          f"(checkpoints {result['throughput']['off_checkpoint_seconds']:.2f} s)")
    for side, t in ratios.items():
        print(f"  {side:<11} ratio {t['ratio_median']:.3f} (median of {args.repeats} interleaved rounds; best-of-runs "
              f"{t['ratio_best_of_runs']:.3f}; rounds {', '.join(f'{x:.2f}' for x in t['per_round'])}); "
              f"recorder {t['recorder_hook_us_per_step']:.0f} us/step on the training thread, "
              f"{t['checkpoints_written']:.0f} checkpoints {t['checkpoint_seconds']:.2f} s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
