"""Training throughput and peak memory of the default model (recorder off).

The baseline the trajectory recorder's overhead is measured against
(benchmarks/recorder.py). Prints a table and writes JSON.

    python benchmarks/train_throughput.py --steps 200 --json bench_out/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from lmcleaner.config import load_config
from lmcleaner.train import Trainer


class _Counter:
    """Counts input tokens per step without touching the training path."""

    def __init__(self):
        self.tokens = 0
        self.supervised = 0

    def on_step_begin(self, engine, step, micro_batches):
        self.tokens += sum(len(engine.dataset[i]["input_ids"]) for mb in micro_batches for i in mb)

    def on_after_backward(self, engine, step):
        pass

    def on_step_end(self, engine, record, batches):
        self.supervised += record.normaliser


def run(steps: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides=[f"training.max_steps={steps}", "training_logger.enabled=false",
                                     "training.logging_steps=0", "training.progress_bar=false",
                                     f"training.output_dir={tmp}/run", *overrides])
        trainer = Trainer(cfg)
        counter = _Counter()
        from lmcleaner.train import engine as engine_mod

        real = engine_mod.run_step
        trainer_mod = sys.modules["lmcleaner.train.trainer"]
        trainer_mod.run_step = lambda e, s, ep, mb, ex, obs: real(e, s, ep, mb, ex, counter)
        try:
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
        finally:
            trainer_mod.run_step = real
        params = sum(p.numel() for p in trainer.engine.unwrapped.parameters())
    return {
        "steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
        "tokens_per_s": counter.tokens / seconds, "supervised_tokens_per_s": counter.supervised / seconds,
        "params": params, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_now_mb": psutil.Process().memory_info().rss / 2**20, "torch_threads": torch.get_num_threads(),
        "overrides": overrides,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default="bench_out/train_throughput.json")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. training.batch_size=16")
    args = ap.parse_args()
    run(10, args.overrides)  # warm-up (allocator, kernels)
    result = run(args.steps, args.overrides)
    print(f"{'params':>10} {'steps/s':>8} {'tokens/s':>10} {'sup tok/s':>10} {'peak RSS MB':>12}")
    print(f"{result['params']:>10} {result['steps_per_s']:>8.1f} {result['tokens_per_s']:>10.0f} "
          f"{result['supervised_tokens_per_s']:>10.0f} {result['peak_rss_mb']:>12.0f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
