"""Where things live inside a training-log directory, and the run identity.

Why one module: the writer, the reader, the replayer and ``inspect`` must
agree on every file name; the format version is bumped here when they change.

Layout of ``log_dir`` (format 1)::

    meta.json              run identity, config, optimizer, fingerprints (atomic)
    steps.jsonl            one checksummed StepRecord per step (the commit log)
    sample_indices.jsonl   one line per use of a sample: id, step, micro-batch, row
    events.jsonl           online deletion requests applied during training
    batch_index.json       step -> sample ids per micro-batch, status (atomic, derived)
    checkpoints.json       restore points: trainer checkpoints + anchors (atomic)
    tensors/<a>-<b>.safetensors  heavy/diag tensors of steps a..b (one per flush)
    anchors/step-<t>/      parameter+optimizer state right after an online correction
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1

META = "meta.json"
STEPS = "steps.jsonl"
SAMPLES = "sample_indices.jsonl"
EVENTS = "events.jsonl"
BATCH_INDEX = "batch_index.json"
CHECKPOINTS = "checkpoints.json"
TENSORS_DIR = "tensors"
ANCHORS_DIR = "anchors"

JSONL_FILES = (STEPS, SAMPLES, EVENTS)

# Keys inside a tensor shard: "<kind>/<step>/<name>"; batches: "batch/<step>/<micro>/<field>".
UPDATE, PATCH_INDEX, PATCH_VALUE, DIAG, BATCH = "u", "pi", "pv", "diag", "batch"


def shard_name(first: int, last: int) -> str:
    return f"{first:08d}-{last:08d}.safetensors"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    if not name.endswith(".safetensors"):
        return None
    stem = name[: -len(".safetensors")]
    a, _, b = stem.partition("-")
    if a.isdigit() and b.isdigit():
        return int(a), int(b)
    return None


def anchor_dir(log_dir: Path, step: int) -> Path:
    return log_dir / ANCHORS_DIR / f"step-{step}"


def tensor_key(kind: str, step: int, name: str) -> str:
    return f"{kind}/{step}/{name}"


def batch_key(step: int, micro: int, fieldname: str) -> str:
    return f"{BATCH}/{step}/{micro}/{fieldname}"


def run_fingerprint(meta: dict[str, Any]) -> str:
    """What makes two trainings *the same run*: data, model, batch plan, optimizer.

    The step budget is left out on purpose: extending ``max_steps`` on resume
    continues the same run.
    """
    ident = {
        "dataset": meta.get("dataset_fingerprint"),
        "num_samples": meta.get("num_samples"),
        "model": meta.get("model_fingerprint"),
        "seed": meta.get("seed"),
        "batch_size": meta.get("batch_size"),
        "gradient_accumulation_steps": meta.get("gradient_accumulation_steps"),
        "world_size": meta.get("world_size"),
        "optimizer": meta.get("optimizer"),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
