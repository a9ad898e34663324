"""Tensor shards: one safetensors file per flush, with a checksum of its data.

Why a checksum: safetensors (no pickle, so loading cannot run code) checks
that the file is complete but not that its bytes are intact. The writer
stores a CRC32 over the key names and tensor bytes in the file's metadata
and the reader verifies it when it loads a shard, so a corrupted shard is an
error naming the file, never silently wrong parameters.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import layout
from .jsonl import TrajectoryLogError


def tensors_crc(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(k.encode(), crc)
        crc = zlib.crc32(memoryview(t.view(torch.uint8).numpy()), crc)
    return f"{crc:08x}"


def write_shard(path: Path, tensors: dict[str, torch.Tensor], first: int, last: int,
                extra: dict[str, str] | None = None) -> int:
    """Write atomically (tmp + rename); returns the size in bytes."""
    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": "lmcleaner-trajectory", "format_version": str(layout.FORMAT_VERSION),
            "first_step": str(first), "last_step": str(last), "crc32": tensors_crc(tensors), **(extra or {})}
    from ..train.outputs import save_tensors

    try:
        save_tensors(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # disk full: no temp shard left behind
        raise
    return path.stat().st_size


def check_header(path: Path) -> str | None:
    """``None`` when the file is a complete safetensors file, else why not."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
        return None
    except Exception as err:  # SafetensorError, OSError
        return str(err).splitlines()[0]


def read_shard(path: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a shard; a one-line error naming the file when it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as err:
        raise TrajectoryLogError(f"{path}: unreadable tensor shard ({str(err).splitlines()[0]})") from None
    want = meta.get("crc32")
    if verify and want is not None and tensors_crc(tensors) != want:
        raise TrajectoryLogError(f"{path}: tensor shard fails its checksum (corrupted on disk); "
                                 f"steps {meta.get('first_step')}..{meta.get('last_step')} cannot be used")
    return tensors


def truncate_shard(path: Path, before: int) -> Path | None:
    """Keep only the steps ``< before`` (resume of a crashed run); returns the new path."""
    rng = layout.parse_shard_name(path.name)
    if rng is None:
        return None
    kept = {k: v for k, v in read_shard(path).items() if int(k.split("/")[1]) < before}
    path.unlink()
    if not kept or rng[0] >= before:
        return None
    new = path.with_name(layout.shard_name(rng[0], before - 1))
    write_shard(new, kept, rng[0], before - 1)
    return new
