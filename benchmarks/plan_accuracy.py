"""``lmcleaner plan`` against measured tiny runs: bytes on disk and unlearning cost.

For each setting, trains a 12-step run (micro Llama, 48 rows, batch 4, one
epoch, checkpoint every 4 steps), then compares the plan's numbers with what
is on disk and what unlearning one sample used at step 5 (age 7) recorded:
one checkpoint, all kept checkpoints, the training log, and the
gradient-equivalents of exact replay and of LMCleaner (K=3, exact HVP).

    python benchmarks/plan_accuracy.py --json bench_out/plan_accuracy.json

Goal: every planned number within 10% of the measured one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from lmcleaner.config import load_config
from lmcleaner.plan.estimate import make_plan, measured_seq_len
from lmcleaner.plan.shapes import model_shape
from lmcleaner.train import Trainer
from lmcleaner.unlearn.session import UnlearnSession

BASE = ["model=micro-llama", "training.num_samples=48", "training.batch_size=4", "training.max_steps=12",
        "training.progress_bar=false", "training.logging_steps=0", "training.torch_threads=1",
        "training_logger.checkpoint_interval=4", "trainer.method_args.K=3"]
SETTINGS = {"micro Llama, full, light": [],
            "micro Llama, LoRA r=4, heavy": ["lora.enabled=true", "lora.r=4", "training_logger.storage=heavy"],
            "tiny Mixtral (top-2 of 4), diag": ["model=tiny-mixtral", "training_logger.storage=diag"]}


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(name: str, extra: list[str], root: Path) -> list[dict]:
    cfg = load_config(overrides=[*BASE, *extra, f"training.output_dir={root / 'run'}"])
    trainer = Trainer(cfg)
    seq_len = measured_seq_len(trainer)
    trainer.train()
    run = root / "run"
    plan = make_plan(cfg, model_shape(cfg.model, cfg.lora), 48, ages=[7], seq_len=seq_len)
    session = UnlearnSession(run)
    sample = session.log.record(5).sample_ids[0]
    replay = session.run("replay", [sample]).info["grad_equivalents_total"]
    lmc = session.run("LMCleanerSampleLevel", [sample], K=3, hessian_mode="exact").info["grad_equivalents_total"]
    st, req = plan["storage"], plan["requests"][0]
    rows = [("one checkpoint (bytes)", st["checkpoint"]["total"], size(run / f"checkpoint-{12}")),
            (f"{len(st['checkpoints_kept'])} checkpoints kept (bytes)", st["checkpoints_total"],
             sum(size(run / f"checkpoint-{k}") for k in st["checkpoints_kept"])),
            ("training log (bytes)", st["log"]["total"], size(run / "training_log")),
            ("replay (gradient-equivalents)", req["replay"]["grad_equivalents"], replay),
            ("LMCleaner K=3 exact (gradient-equivalents)", req["lmcleaner"]["grad_equivalents"], lmc)]
    return [{"setting": name, "quantity": q, "planned": p, "measured": m, "error": (p - m) / m} for q, p, m in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, extra) in enumerate(SETTINGS.items()):
            rows += measure(name, extra, Path(tmp) / str(k))
    print("| setting | quantity | planned | measured | error |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['quantity']} | {r['planned']:,.0f} | {r['measured']:,.0f} | {100 * r['error']:+.2f}% |")
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst error {100 * worst:.2f}% (goal <= 10%: {'met' if worst <= 0.1 else 'NOT met'})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "worst_error": worst}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
