"""Checkpoints without pickle: safetensors for tensors, JSON for the rest.

``checkpoint-<t>/`` holds the state *before* step ``t`` (after ``t`` completed
steps, the Hugging Face convention):

- ``model.safetensors``: trainable parameters (frozen ones are rebuilt
  deterministically from the base model);
- ``optimizer.safetensors`` + ``optimizer.json``: per-parameter state keyed by
  parameter name, and the param-group hyper-parameters;
- ``scheduler.json``, ``rng.safetensors`` + ``rng.json``;
- ``trainer_state.json``: step, epoch, best metric, loss history, config;
- ``checksums.json``: the SHA-256 of every file above.

A checkpoint is written to a temporary directory and renamed into place, so a
crash never leaves a half-written ``checkpoint-<t>``; a failed write (disk
full) removes its temporary directory.

Integrity: safetensors refuses a malformed file but not a flipped bit in the
tensor data, so every file's hash is written next to it (``checksums.json``)
and recorded in the trajectory log (``checkpoints.json``). Loading verifies
them (once per file version per process) and every malformed input (crafted
safetensors header, a pickle in place of a safetensors file, broken JSON) is
a one-line :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .outputs import AtomicDir, save_tensors, with_filename

CHECKPOINT_PREFIX = "checkpoint-"
CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    pass


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(output_dir: str | Path) -> dict[int, Path]:
    out = {}
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            name = p.name
            if p.is_dir() and name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
                if (p / "trainer_state.json").is_file():
                    out[int(name[len(CHECKPOINT_PREFIX):])] = p
    return dict(sorted(out.items()))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)  # disk full: no half-written temp file stays behind
        raise with_filename(err, path) from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_sha256(paths: list[Path], hasher=None) -> list[str]:
    """Hashes of several files, in parallel threads (hashlib and file reads release the GIL:
    the model and optimizer files of a checkpoint are hashed at the same time)."""
    from concurrent.futures import ThreadPoolExecutor

    hasher = hasher or file_sha256
    if len(paths) < 2:
        return [hasher(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(4, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(hasher, paths))


_VERIFIED: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime_ns, inode) -> sha256 seen


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_sha256(path)
    return _VERIFIED[key]


def read_checksums(path: str | Path) -> dict[str, str] | None:
    """``{file: sha256}`` from ``checksums.json`` (``None`` for checkpoints written before it existed)."""
    f = Path(path) / CHECKSUMS
    if not f.is_file():
        return None
    doc = _read_json(f)
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{f}: malformed checksum file (expected {{\"files\": {{name: sha256}}}})")
    return files


def verify_checkpoint(path: str | Path, expected: dict[str, str] | None = None) -> None:
    """Check every file against ``checksums.json`` and, when given, the hashes the log recorded.

    Raises a one-line :class:`CheckpointError` naming the first file that differs."""
    path = Path(path)
    own = read_checksums(path)
    tables = (("recorded in the training log", expected), (CHECKSUMS, own))
    names = sorted({n for _, t in tables for n in (t or {})})
    for name in names:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing (listed in {CHECKSUMS} or the training log): the "
                                  "checkpoint is incomplete; use another checkpoint")
    found = dict(zip(names, files_sha256([path / n for n in names], _cached_sha256)))
    for source, table in tables:
        for name, want in sorted((table or {}).items()):
            f = path / name
            got = found[name]
            if got != want:
                raise CheckpointError(f"{f}: sha256 {got[:12]}... differs from {want[:12]}... {source}: the file "
                                      "is corrupted or belongs to another run; use another checkpoint or restore it")


def _read_json(f: Path) -> Any:
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing (incomplete checkpoint)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{f}: not valid JSON ({str(err).splitlines()[0]}); the checkpoint is damaged") from None


def _load_tensors(f: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a one-line error (truncated, crafted header, a pickle in its place)."""
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (incomplete checkpoint)")
    try:
        return load_file(str(f))
    except Exception as err:  # SafetensorError, OSError: the file is not what it claims to be
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{f}: not a valid safetensors file ({first}); the checkpoint is damaged or was "
                              "not written by lmcleaner (pickles are never loaded)") from None


def _tensors(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in d.items()}


def optimizer_to_flat(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    names: dict[int, str] = {}
    for g in sd["param_groups"]:
        for idx, name in zip(g["params"], g["param_names"]):
            names[idx] = name
    tensors = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{names[idx]}::{k}"] = v
            else:
                scalars.setdefault(names[idx], {})[k] = v
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return _tensors(tensors), {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    sd = optimizer.state_dict()
    index = {name: idx for g in sd["param_groups"] for idx, name in zip(g["params"], g["param_names"])}
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        name, k = key.split("::", 1)
        if name not in index:
            raise CheckpointError(f"optimizer state for unknown parameter '{name}': checkpoint from another model")
        state.setdefault(index[name], {})[k] = v
    for name, d in meta.get("scalars", {}).items():
        state.setdefault(index[name], {}).update(d)
    groups = []
    for saved, cur in zip(meta["param_groups"], sd["param_groups"]):
        groups.append({**saved, "params": cur["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def optimizer_state_by_name(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"name::exp_avg": t}`` -> ``{"name": {"exp_avg": t}}`` (for the unlearning engine)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        name, k = key.split("::", 1)
        out.setdefault(name, {})[k] = v
    return out


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(path: Path, params: dict[str, torch.Tensor], optimizer, scheduler,
                    trainer_state: dict[str, Any]) -> Path:
    """Write ``path`` atomically (temp dir + rename) with ``checksums.json``; returns ``path``."""
    path = Path(path)
    with AtomicDir(path) as out:
        tmp = out.tmp
        save_tensors(_tensors(params), tmp / "model.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        write_json_atomic(tmp / "optimizer.json", opt_meta)
        write_json_atomic(tmp / "scheduler.json", scheduler.state_dict())
        rng_tensors, rng_meta = _rng_state()
        save_tensors(_tensors(rng_tensors), tmp / "rng.safetensors")
        write_json_atomic(tmp / "rng.json", rng_meta)
        write_json_atomic(tmp / "trainer_state.json", trainer_state)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith("."))
        hashes = files_sha256([tmp / n for n in names])
        write_json_atomic(tmp / CHECKSUMS, {"algorithm": "sha256", "files": dict(zip(names, hashes))})
        out.commit()
    return path


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "trainer_state.json"
    if not f.is_file():
        raise CheckpointError(f"no checkpoint at {path}: trainer_state.json missing (give a checkpoint-<step> dir)")
    state = _read_json(f)
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: expected a JSON object; the checkpoint is damaged")
    return state


def load_params(path: str | Path) -> dict[str, torch.Tensor]:
    return _load_tensors(Path(path) / "model.safetensors")


def load_optimizer_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return _load_tensors(Path(path) / "optimizer.safetensors")


def load_checkpoint(path: str | Path, model_params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    restore_rng: bool = True, expected: dict[str, str] | None = None) -> dict[str, Any]:
    """Restore in place after verifying the files' hashes; returns the trainer state.

    ``expected``: ``{file: sha256}`` the trajectory log recorded for this checkpoint."""
    path = Path(path)
    state = read_trainer_state(path)
    verify_checkpoint(path, expected)
    saved = load_params(path)
    missing = set(model_params) - set(saved)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks parameters {sorted(missing)[:3]}...: different model/LoRA setup")
    try:
        with torch.no_grad():
            for name, p in model_params.items():
                p.copy_(saved[name].to(p.dtype))
        optimizer_from_flat(optimizer, load_optimizer_tensors(path), _read_json(path / "optimizer.json"))
        scheduler.load_state_dict(_read_json(path / "scheduler.json"))
        if restore_rng:
            _set_rng_state(_load_tensors(path / "rng.safetensors"), _read_json(path / "rng.json"))
    except CheckpointError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: malformed checkpoint ({type(err).__name__}: {first}); the checkpoint is "
                              "damaged or from another model/optimizer setup") from None
    return state
