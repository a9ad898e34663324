"""Benchmark lmcleaner.telemetry: handler throughput and per-step overhead.

Measures
1. records/s through ``CSVHandler`` (caller side = emitting a burst, which
   includes the GIL time the writer thread takes meanwhile; end-to-end =
   until ``flush()`` returns with every row on disk);
2. records/s through ``TensorBoardHandler`` (same two numbers);
3. the cost of one ``log_training_progress`` call with telemetry off (no
   session) and on (default YAML), in hot bursts;
4. the time per step of a tiny-Llama plain-torch training loop (~50 steps
   per arm) with default telemetry off vs on, in alternating blocks of one
   run, plus the time of the helper call inside the loop (cold caches after
   the torch step make it several times the hot-burst cost).

On a small shared machine step times are quantised by preemption from other
processes; compare the paired-block ratio and the in-loop helper time rather
than a single mean.

Usage::

    PYTHONPATH=src python benchmarks/telemetry.py [--json bench_out/telemetry.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from lmcleaner import telemetry
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from lmcleaner import telemetry

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def _isolated_logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def bench_handler(kind: str, n_records: int, workdir: Path) -> dict[str, Any]:
    """Push ``n_records`` 4-metric records through one handler via a logger."""
    if kind == "csv":
        # Unbounded queue: "enqueue" then measures the caller's side alone
        # instead of waiting for the writer (back-pressure).
        handler: telemetry.BackgroundHandler = telemetry.CSVHandler(workdir / "bench.csv", queue_size=0)
        logger_name = "lmcleaner_bench.csv"
    else:
        handler = telemetry.TensorBoardHandler(workdir / "tb", queue_size=0)
        logger_name = "lmcleaner_bench.training"
    logger = _isolated_logger(logger_name, handler)
    start = time.perf_counter()
    for step in range(n_records):
        telemetry.emit_metrics(
            logger, {"loss": 1.0 / (step + 1), "lr": 1e-4, "grad_norm": 0.5, "tokens": step * 512}, step=step
        )
    enqueued = time.perf_counter() - start
    handler.flush()
    written = time.perf_counter() - start
    handler.close()
    logger.handlers.clear()
    return {
        "handler": kind,
        "records": n_records,
        "enqueue_s": enqueued,
        "end_to_end_s": written,
        "enqueue_records_per_s": n_records / enqueued,
        "end_to_end_records_per_s": n_records / written,
    }


def bench_call_cost(n_bursts: int, burst: int, workdir: Path) -> dict[str, float]:
    """Microseconds per ``log_training_progress`` call, telemetry off vs on.

    Calls come in bursts of ``burst`` (below the queue size) with a flush in
    between, so "on" measures the caller's cost plus the GIL time the writer
    threads take meanwhile, not the writers' throughput. A training loop
    calls once per step, far below any burst.
    """
    metrics = {"loss": 0.5, "lr": 1e-4, "grad_norm": 1.0}

    def timed(step0: int) -> float:
        total = 0.0
        for b in range(n_bursts):
            start = time.perf_counter()
            for step in range(step0 + b * burst, step0 + (b + 1) * burst):
                telemetry.log_training_progress(step, metrics)
            total += time.perf_counter() - start
            telemetry.flush()
        return total / (n_bursts * burst)

    telemetry.shutdown()
    off = timed(0)
    telemetry.initialize(output_dir=workdir / "call_cost")
    telemetry.get_system_logger().setLevel(logging.WARNING)  # keep the console quiet
    on = timed(0)
    telemetry.shutdown()
    return {"calls": n_bursts * burst, "burst": burst, "off_us_per_call": off * 1e6, "on_us_per_call": on * 1e6}


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def _train_steps(
    model: LlamaForCausalLM, opt: torch.optim.Optimizer, batches: list[torch.Tensor], step0: int
) -> tuple[list[float], list[float]]:
    """Plain torch loop; every step calls the helper exactly as a user loop would.

    Returns the wall time of each step and of the helper call inside it.
    """
    times, helper = [], []
    for i, ids in enumerate(batches):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics = {"loss": loss.item(), "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm.item()}
        t1 = time.perf_counter()
        telemetry.log_training_progress(step0 + i, metrics)
        t2 = time.perf_counter()
        times.append(t2 - t0)
        helper.append(t2 - t1)
    return times, helper


def bench_training(steps: int, workdir: Path, blocks: int = 10) -> dict[str, Any]:
    """Per-step time with telemetry off vs on, in alternating blocks.

    Alternating off/on blocks (``steps`` each in total) in one run cancels slow
    drifts (CPU boost, other processes) that a plain "off then on" run would
    attribute to telemetry. Each block starts with one untimed step. The time
    of the helper call itself is reported too: it is what the training thread
    pays directly and is far less noisy than the difference of step times.
    """
    model = _tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    per_block = max(1, steps // blocks)
    batches = [torch.randint(0, 64, (8, 32), generator=g) for _ in range(per_block + 1)]
    telemetry.shutdown()
    _train_steps(model, opt, batches * 2, 0)  # warm-up (allocator, kernels)
    off: list[float] = []
    on: list[float] = []
    off_helper: list[float] = []
    on_helper: list[float] = []
    block_ratios: list[float] = []
    step = 0
    shutdown_s = 0.0
    for _ in range(blocks):
        off_times, helper = _train_steps(model, opt, batches, step)
        off += off_times[1:]
        off_helper += helper[1:]
        step += len(batches)
        telemetry.initialize(output_dir=workdir / "training")
        telemetry.get_system_logger().setLevel(logging.WARNING)
        on_times, helper = _train_steps(model, opt, batches, step)
        on += on_times[1:]
        on_helper += helper[1:]
        step += len(batches)
        block_ratios.append(statistics.median(on_times[1:]) / statistics.median(off_times[1:]))
        t0 = time.perf_counter()
        telemetry.shutdown()
        shutdown_s = max(shutdown_s, time.perf_counter() - t0)
    off_mean, on_mean = statistics.fmean(off), statistics.fmean(on)
    off_med, on_med = statistics.median(off), statistics.median(on)
    return {
        "steps_each": len(off),
        "blocks": blocks,
        "off_ms_per_step_mean": off_mean * 1e3,
        "on_ms_per_step_mean": on_mean * 1e3,
        "off_ms_per_step_median": off_med * 1e3,
        "on_ms_per_step_median": on_med * 1e3,
        "added_ms_per_step_mean": (on_mean - off_mean) * 1e3,
        "added_ms_per_step_median": (on_med - off_med) * 1e3,
        "ratio_on_over_off_mean": on_mean / off_mean,
        "ratio_on_over_off_median": on_med / off_med,
        "ratio_on_over_off_paired_blocks_median": statistics.median(block_ratios),
        # Preemption by other processes only ever adds time; the fastest
        # step is the least disturbed estimate of the true step cost (timeit's rule).
        "off_ms_per_step_min": min(off) * 1e3,
        "on_ms_per_step_min": min(on) * 1e3,
        "added_ms_per_step_min": (min(on) - min(off)) * 1e3,
        "ratio_on_over_off_min": min(on) / min(off),
        "block_ratios": block_ratios,
        "max_shutdown_s": shutdown_s,
        "helper_us_per_step_off_mean": statistics.fmean(off_helper) * 1e6,
        "helper_us_per_step_on_mean": statistics.fmean(on_helper) * 1e6,
        "helper_us_per_step_off_median": statistics.median(off_helper) * 1e6,
        "helper_us_per_step_on_median": statistics.median(on_helper) * 1e6,
        "helper_us_per_step_on_max": max(on_helper) * 1e6,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="bench_out/telemetry.json", help="where to write the results")
    parser.add_argument("--csv-records", type=int, default=100_000)
    parser.add_argument("--tb-records", type=int, default=20_000)
    parser.add_argument("--bursts", type=int, default=40)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch intra-op threads (1 keeps step times stable on small, shared machines; 0 = torch default)",
    )
    args = parser.parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory(prefix="lmcleaner-telemetry-bench-") as tmp:
        work = Path(tmp)
        csv_res = bench_handler("csv", args.csv_records, work)
        tb_res = bench_handler("tensorboard", args.tb_records, work)
        call_res = bench_call_cost(args.bursts, args.burst, work)
        train_res = bench_training(args.steps, work)

    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "csv_handler": csv_res,
        "tensorboard_handler": tb_res,
        "log_training_progress_call": call_res,
        "training_loop": train_res,
    }
    print(f"load average (1 min) during the run: {train_res['load_average_1min']}")
    print(_table([
        ("CSVHandler caller side, burst (records/s)", f"{csv_res['enqueue_records_per_s']:,.0f}"),
        ("CSVHandler end-to-end (records/s)", f"{csv_res['end_to_end_records_per_s']:,.0f}"),
        ("TensorBoardHandler caller side, burst (records/s)", f"{tb_res['enqueue_records_per_s']:,.0f}"),
        ("TensorBoardHandler end-to-end (records/s, 4 scalars each)", f"{tb_res['end_to_end_records_per_s']:,.0f}"),
        (f"log_training_progress off (us/call, bursts of {call_res['burst']})", f"{call_res['off_us_per_call']:.2f}"),
        (f"log_training_progress on, default YAML (us/call, bursts of {call_res['burst']})", f"{call_res['on_us_per_call']:.2f}"),
        (f"tiny-Llama step, telemetry off (ms, mean/median of {train_res['steps_each']})",
         f"{train_res['off_ms_per_step_mean']:.3f} / {train_res['off_ms_per_step_median']:.3f}"),
        (f"tiny-Llama step, telemetry on  (ms, mean/median of {train_res['steps_each']})",
         f"{train_res['on_ms_per_step_mean']:.3f} / {train_res['on_ms_per_step_median']:.3f}"),
        ("tiny-Llama step, fastest off / on (ms)",
         f"{train_res['off_ms_per_step_min']:.3f} / {train_res['on_ms_per_step_min']:.3f}"),
        ("added per step (ms, mean / median / fastest)",
         f"{train_res['added_ms_per_step_mean']:+.3f} / {train_res['added_ms_per_step_median']:+.3f}"
         f" / {train_res['added_ms_per_step_min']:+.3f}"),
        ("log_training_progress in the loop, off (us/step, mean/median)",
         f"{train_res['helper_us_per_step_off_mean']:.1f} / {train_res['helper_us_per_step_off_median']:.1f}"),
        ("log_training_progress in the loop, on  (us/step, mean/median/max)",
         f"{train_res['helper_us_per_step_on_mean']:.1f} / {train_res['helper_us_per_step_on_median']:.1f}"
         f" / {train_res['helper_us_per_step_on_max']:.0f}"),
        ("step time ratio on/off (mean / median / paired-block median / fastest)",
         f"{train_res['ratio_on_over_off_mean']:.3f} / {train_res['ratio_on_over_off_median']:.3f}"
         f" / {train_res['ratio_on_over_off_paired_blocks_median']:.3f} / {train_res['ratio_on_over_off_min']:.3f}"),
        ("shutdown (flush + close), worst of blocks (s)", f"{train_res['max_shutdown_s']:.3f}"),
    ]))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
