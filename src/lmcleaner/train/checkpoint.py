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

Sharded (FSDP) checkpoints, for resume without gathering the model on one
rank: every rank writes its own parts, ``model-rank<r>-of-<W>.safetensors``
and ``optimizer-rank<r>-of-<W>.safetensors`` (the local tensors of its
``DTensor`` s; replicated tensors only in rank 0's file), and rank 0 writes
``sharding.json`` (per tensor: global shape and the dimension it is split
along) plus the JSON files above. No ``torch.distributed.checkpoint``: its
default planner writes pickled metadata. All ranks write into one temporary
directory that rank 0 renames after a barrier (a filesystem shared by the
ranks is assumed, as for any multi-process checkpoint). Reading is layout
agnostic: the same world size reads its own part only; any other reader
(one process for replay and unlearning, or another world size) concatenates
the parts along the recorded dimension and takes what it holds.

Integrity: safetensors refuses a malformed file but not a flipped bit in the
tensor data, so every file's hash is written next to it (``checksums.json``)
and recorded in the trajectory log (``checkpoints.json``). In a sharded
checkpoint each rank hashes the parts it wrote (in parallel, into a hidden
``.sha256-rank<r>.json``) and rank 0 merges them, after the barrier, with the
hashes of its JSON files into one table. Loading verifies the files it reads
(once per file version per process: a rank resuming at the recorded world
size hashes only its own parts and the shared files) and every malformed
input (crafted safetensors header, a pickle in place of a safetensors file,
broken JSON) is a one-line :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from . import distributed as dist_utils
from .outputs import AtomicDir, save_tensors, with_filename

CHECKPOINT_PREFIX = "checkpoint-"
CHECKSUMS = "checksums.json"
SHARDING = "sharding.json"
SHARDED_FORMAT = "lmcleaner-sharded-checkpoint-v1"
_PART = re.compile(r"^(model|optimizer)-rank\d+-of-\d+\.safetensors$")


def shard_name(kind: str, rank: int, world_size: int) -> str:
    return f"{kind}-rank{rank:05d}-of-{world_size:05d}.safetensors"


def _rank_hashes(rank: int) -> str:
    return f".sha256-rank{rank:05d}.json"  # hidden: never listed in checksums.json itself


@dataclass
class Ranks:
    """Who writes a sharded checkpoint: this rank, the world size, and a barrier."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    device: Any = None  # where the collective that agrees on the temporary name runs

    @classmethod
    def of(cls, accelerator) -> "Ranks":
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
                   accelerator.device)

    def owner_pid(self) -> int:
        """Rank 0's PID on every rank (a collective: every rank calls it at the same point)."""
        return dist_utils.main_process_pid(self.device)


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
    doc = read_json(f)
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{f}: malformed checksum file (expected {{\"files\": {{name: sha256}}}})")
    return files


def verify_checkpoint(path: str | Path, expected: dict[str, str] | None = None,
                      names: list[str] | None = None) -> None:
    """Check the files against ``checksums.json`` and, when given, the hashes the log recorded
    (``names``: only these files, e.g. the parts one rank reads; default: every listed file).

    Raises a one-line :class:`CheckpointError` naming the first file that differs."""
    path = Path(path)
    own = read_checksums(path)
    tables = (("recorded in the training log", expected), (CHECKSUMS, own))
    listed = sorted({n for _, t in tables for n in (t or {})})
    if names is not None:
        listed = [n for n in listed if n in set(names)]
    for name in listed:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing (listed in {CHECKSUMS} or the training log): the "
                                  "checkpoint is incomplete; use another checkpoint")
    found = dict(zip(listed, files_sha256([path / n for n in listed], _cached_sha256)))
    for source, table in tables:
        for name, want in sorted((table or {}).items()):
            if name not in found:
                continue
            got = found[name]
            if got != want:
                raise CheckpointError(f"{path / name}: sha256 {got[:12]}... differs from {want[:12]}... {source}: the "
                                      "file is corrupted or belongs to another run; use another checkpoint or restore it")


def read_json(f: Path) -> Any:
    """A checkpoint's JSON file, or a one-line :class:`CheckpointError` (missing, not JSON)."""
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
    tensors, meta = _optimizer_flat(optimizer)
    return _tensors(tensors), meta


def _optimizer_flat(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """``{"name::key": tensor}`` (live, possibly sharded) and the JSON part of the state."""
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
    return tensors, {"param_groups": groups, "scalars": scalars}


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
                    trainer_state: dict[str, Any], ranks: Ranks | None = None) -> Path:
    """Write ``checkpoint-<t>`` atomically (temp dir + rename) with ``checksums.json``; returns ``path``.

    Plain parameters: one process writes (the caller picks the main one).
    Sharded parameters (FSDP): every rank calls this with ``ranks`` (see the module doc)."""
    path = Path(path)
    if any(dist_utils.is_sharded(p) for p in params.values()):
        if ranks is None:
            raise CheckpointError("sharded parameters need every rank to write its part (pass ranks=Ranks(...))")
        return _save_sharded(path, params, optimizer, scheduler, trainer_state, ranks)
    with AtomicDir(path) as out:
        tmp = out.tmp
        save_tensors(_tensors(params), tmp / "model.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        _write_json_parts(tmp, opt_meta, scheduler, trainer_state)
        _write_checksums(tmp)
        out.commit()
    return path


def _write_json_parts(tmp: Path, opt_meta: dict, scheduler, trainer_state: dict[str, Any]) -> None:
    write_json_atomic(tmp / "optimizer.json", opt_meta)
    write_json_atomic(tmp / "scheduler.json", scheduler.state_dict())
    rng_tensors, rng_meta = _rng_state()
    save_tensors(_tensors(rng_tensors), tmp / "rng.safetensors")
    write_json_atomic(tmp / "rng.json", rng_meta)
    write_json_atomic(tmp / "trainer_state.json", trainer_state)


def _write_checksums(tmp: Path, known: dict[str, str] | None = None) -> None:
    """``checksums.json`` over every file in ``tmp``; ``known``: hashes already computed (the ranks' parts)."""
    known = dict(known or {})
    names = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in known)
    known.update(zip(names, files_sha256([tmp / n for n in names])))
    write_json_atomic(tmp / CHECKSUMS, {"algorithm": "sha256", "files": dict(sorted(known.items()))})


def _split(named: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(this rank's part of every tensor, their layouts); replicated tensors go to rank 0 only."""
    parts, layouts = {}, {}
    for n, t in named.items():
        lay = dist_utils.layout(t)
        layouts[n] = lay
        if lay["shard_dim"] is not None or rank == 0:
            parts[n] = dist_utils.local(t).detach().to("cpu").contiguous().clone()
    return parts, layouts


def _save_sharded(path: Path, params, optimizer, scheduler, trainer_state, ranks: Ranks) -> Path:
    # One temporary directory for all ranks, named with rank 0's PID (like a one-process save, so
    # a killed run's leftover is recognised and removed); rank 0 creates and renames it.
    out = AtomicDir(path, tag=str(ranks.owner_pid()))
    tmp = out.tmp
    if ranks.rank == 0:
        out.reserve()
    ranks.barrier()
    try:
        model_parts, model_layout = _split(params, ranks.rank)
        mine = [shard_name("model", ranks.rank, ranks.world_size), shard_name("optimizer", ranks.rank, ranks.world_size)]
        save_tensors(model_parts, tmp / mine[0])
        opt_tensors, opt_meta = _optimizer_flat(optimizer)
        opt_parts, opt_layout = _split(opt_tensors, ranks.rank)
        save_tensors(opt_parts, tmp / mine[1])
        del model_parts, opt_parts
        # every rank hashes its own parts, in parallel with the others
        write_json_atomic(tmp / _rank_hashes(ranks.rank), dict(zip(mine, files_sha256([tmp / n for n in mine]))))
    except BaseException:
        if ranks.rank == 0:
            out.abort()
        raise  # a failed rank exits; the launcher (torchrun) then stops the others waiting at the barrier
    ranks.barrier()
    if ranks.rank == 0:
        with out:
            write_json_atomic(tmp / SHARDING, {"format": SHARDED_FORMAT, "world_size": ranks.world_size,
                                               "model": model_layout, "optimizer": opt_layout})
            _write_json_parts(tmp, opt_meta, scheduler, trainer_state)
            known: dict[str, str] = {}
            for r in range(ranks.world_size):
                f = tmp / _rank_hashes(r)
                if not f.is_file():
                    raise CheckpointError(f"{tmp}: rank {r} did not write its part; the checkpoint was not saved")
                known.update(read_json(f))
                f.unlink()
            _write_checksums(tmp, known)
            out.commit()
    ranks.barrier()  # on return the checkpoint is in place for every rank
    return path


class _Tensors:
    """One kind of tensors (``model`` | ``optimizer``) of a checkpoint: a full file or per-rank parts.

    ``verify(name)``: called before a file is read (hash check), or ``None``."""

    def __init__(self, path: Path, kind: str, verify: Callable[[str], None] | None = None):
        self.path, self.kind, self.verify = Path(path), kind, verify
        self._parts: dict[int, dict[str, torch.Tensor]] = {}
        self._whole: dict[str, torch.Tensor] | None = None
        full = self.path / f"{kind}.safetensors"
        if full.is_file():
            self.layout, self.world_size = None, 1
            self._whole = self._load(full.name)
            return
        sharding = self.path / SHARDING
        if not sharding.is_file():
            raise CheckpointError(f"{self.path}: neither {kind}.safetensors nor {SHARDING} (not a checkpoint)")
        if self.verify is not None:
            self.verify(SHARDING)
        meta = read_json(sharding)
        if not isinstance(meta, dict) or meta.get("format") != SHARDED_FORMAT:
            raise CheckpointError(f"{sharding}: unknown format "
                                  f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}")
        try:
            self.layout, self.world_size = dict(meta[kind]), int(meta["world_size"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{sharding}: malformed (needs '{kind}' and 'world_size'); the checkpoint is "
                                  "damaged") from None
        if not 1 <= self.world_size <= 1 << 20:
            raise CheckpointError(f"{sharding}: world_size {self.world_size} out of range; the checkpoint is damaged")

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        if self.verify is not None:
            self.verify(name)
        return _load_tensors(self.path / name)

    def keys(self) -> list[str]:
        return list(self._whole) if self.layout is None else list(self.layout)

    def _part(self, rank: int) -> dict[str, torch.Tensor]:
        if rank not in self._parts:
            name = shard_name(self.kind, rank, self.world_size)
            if not (self.path / name).is_file():
                raise CheckpointError(f"{self.path}: part {name} is missing (incomplete sharded checkpoint)")
            self._parts[rank] = self._load(name)
        return self._parts[rank]

    def shape(self, key: str) -> list[int]:
        return list(self._whole[key].shape) if self.layout is None else list(self.layout[key]["shape"])

    def whole(self, key: str) -> torch.Tensor:
        if self.layout is None:
            return self._whole[key]
        lay = self.layout[key]
        if lay["shard_dim"] is None:
            return self._part(0)[key]
        value = torch.cat([self._part(r)[key] for r in range(self.world_size)], dim=lay["shard_dim"])
        if list(value.shape) != lay["shape"]:
            raise CheckpointError(f"{self.path}: parts of {key} join to {list(value.shape)}, expected {lay['shape']}")
        return value

    def like(self, key: str, target: torch.Tensor | None) -> torch.Tensor:
        """``key`` as ``target`` holds it (this rank's part when sharded), full when ``target`` is None."""
        if target is None or not dist_utils.is_sharded(target):
            return self.whole(key)
        lay = self.layout.get(key) if self.layout is not None else None
        mesh = target.device_mesh
        if (lay is not None and mesh.ndim == 1 and mesh.size() == self.world_size
                and dist_utils.layout(target)["shard_dim"] == lay["shard_dim"] and lay["shard_dim"] is not None):
            part = self._part(mesh.get_coordinate()[0])[key]  # same layout: read only this rank's part
            if tuple(part.shape) == tuple(target.to_local().shape):
                return dist_utils.from_local(part, target)
        return dist_utils.place(self.whole(key), target)

    def all(self) -> dict[str, torch.Tensor]:
        try:
            return {k: self.whole(k) for k in self.keys()}
        except (KeyError, TypeError, IndexError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{self.path}: malformed {self.kind} tensors ({type(err).__name__}: {first}); the "
                                  "checkpoint is damaged") from None


def has_params(path: str | Path) -> bool:
    """Whether ``path`` holds model parameters (a full file or a sharded set)."""
    return (Path(path) / "model.safetensors").is_file() or (Path(path) / SHARDING).is_file()


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "trainer_state.json"
    if not f.is_file():
        raise CheckpointError(f"no checkpoint at {path}: trainer_state.json missing (give a checkpoint-<step> dir)")
    state = read_json(f)
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: expected a JSON object; the checkpoint is damaged")
    return state


def load_params(path: str | Path) -> dict[str, torch.Tensor]:
    """All trainable parameters, full (a sharded checkpoint is joined). Hashes: see :func:`verify_checkpoint`."""
    return _Tensors(Path(path), "model").all()


def load_optimizer_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return _Tensors(Path(path), "optimizer").all()


def load_checkpoint(path: str | Path, model_params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    restore_rng: bool = True, expected: dict[str, str] | None = None) -> dict[str, Any]:
    """Restore in place (plain or sharded parameters, from a full or sharded checkpoint) after
    verifying the hashes of the files it reads; returns the trainer state.

    ``expected``: ``{file: sha256}`` the trajectory log recorded for this checkpoint."""
    path = Path(path)
    state = read_trainer_state(path)
    listed = set(read_checksums(path) or {}) | set(expected or {})
    verify_checkpoint(path, expected, names=[n for n in listed if not _PART.match(n)])  # the parts: when read

    def verify(name: str) -> None:
        verify_checkpoint(path, expected, names=[name])

    saved = _Tensors(path, "model", verify)
    missing = set(model_params) - set(saved.keys())
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks parameters {sorted(missing)[:3]}...: different model/LoRA setup")
    try:
        with torch.no_grad():
            for name, p in model_params.items():
                dist_utils.local(p).copy_(dist_utils.local(saved.like(name, p)).to(p.dtype))
        opt = _Tensors(path, "optimizer", verify)
        tensors = {}
        for key in opt.keys():
            p = model_params.get(key.split("::", 1)[0])
            shaped_like_p = p is not None and dist_utils.is_sharded(p) and opt.shape(key) == list(p.shape)
            tensors[key] = opt.like(key, p if shaped_like_p else None)  # e.g. exp_avg sharded like p, step replicated
        optimizer_from_flat(optimizer, tensors, read_json(path / "optimizer.json"))
        scheduler.load_state_dict(read_json(path / "scheduler.json"))
        if restore_rng:
            _set_rng_state(_load_tensors(path / "rng.safetensors"), read_json(path / "rng.json"))
    except CheckpointError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: malformed checkpoint ({type(err).__name__}: {first}); the checkpoint is "
                              "damaged or from another model/optimizer setup") from None
    return state
