"""Checkpoints without pickle: safetensors for tensors, JSON for the rest.

``checkpoint-<t>/`` holds the state *before* step ``t`` (after ``t`` completed
steps, the Hugging Face convention):

- ``model.safetensors``: trainable parameters (frozen ones are rebuilt
  deterministically from the base model);
- ``optimizer.safetensors`` + ``optimizer.json``: per-parameter state keyed by
  parameter name, and the param-group hyper-parameters;
- ``scheduler.json``, ``rng.safetensors`` + ``rng.json``;
- ``trainer_state.json``: step, epoch, best metric, loss history, config.

A checkpoint is written to a temporary directory and renamed into place, so a
crash never leaves a half-written ``checkpoint-<t>``.

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
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import distributed as dist_utils

CHECKPOINT_PREFIX = "checkpoint-"
SHARDING = "sharding.json"
SHARDED_FORMAT = "lmcleaner-sharded-checkpoint-v1"


def shard_name(kind: str, rank: int, world_size: int) -> str:
    return f"{kind}-rank{rank:05d}-of-{world_size:05d}.safetensors"


@dataclass
class Ranks:
    """Who writes a sharded checkpoint: this rank, the world size, and a barrier."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None

    @classmethod
    def of(cls, accelerator) -> "Ranks":
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)


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
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


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
    """Write ``checkpoint-<t>`` atomically.

    Plain parameters: one process writes (the caller picks the main one).
    Sharded parameters (FSDP): every rank calls this with ``ranks`` (see the module doc)."""
    path = Path(path)
    if any(dist_utils.is_sharded(p) for p in params.values()):
        if ranks is None:
            raise CheckpointError("sharded parameters need every rank to write its part (pass ranks=Ranks(...))")
        return _save_sharded(path, params, optimizer, scheduler, trainer_state, ranks)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_tensors(params), str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    _write_json_parts(tmp, opt_meta, scheduler, trainer_state)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _write_json_parts(tmp: Path, opt_meta: dict, scheduler, trainer_state: dict[str, Any]) -> None:
    write_json_atomic(tmp / "optimizer.json", opt_meta)
    write_json_atomic(tmp / "scheduler.json", scheduler.state_dict())
    rng_tensors, rng_meta = _rng_state()
    save_file(_tensors(rng_tensors), str(tmp / "rng.safetensors"))
    write_json_atomic(tmp / "rng.json", rng_meta)
    write_json_atomic(tmp / "trainer_state.json", trainer_state)  # last: list_checkpoints looks for it


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
    tmp = path.with_name(path.name + ".tmp-sharded")  # one name for all ranks
    if ranks.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    ranks.barrier()
    model_parts, model_layout = _split(params, ranks.rank)
    save_file(model_parts, str(tmp / shard_name("model", ranks.rank, ranks.world_size)))
    opt_tensors, opt_meta = _optimizer_flat(optimizer)
    opt_parts, opt_layout = _split(opt_tensors, ranks.rank)
    save_file(opt_parts, str(tmp / shard_name("optimizer", ranks.rank, ranks.world_size)))
    ranks.barrier()
    if ranks.rank == 0:
        write_json_atomic(tmp / SHARDING, {"format": SHARDED_FORMAT, "world_size": ranks.world_size,
                                           "model": model_layout, "optimizer": opt_layout})
        _write_json_parts(tmp, opt_meta, scheduler, trainer_state)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    ranks.barrier()  # on return the checkpoint is in place for every rank
    return path


class _Tensors:
    """One kind of tensors (``model`` | ``optimizer``) of a checkpoint: a full file or per-rank parts."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = Path(path), kind
        self._parts: dict[int, dict[str, torch.Tensor]] = {}
        self._whole: dict[str, torch.Tensor] | None = None
        full = self.path / f"{kind}.safetensors"
        if full.is_file():
            self.layout, self.world_size = None, 1
            self._whole = load_file(str(full))
            return
        sharding = self.path / SHARDING
        if not sharding.is_file():
            raise CheckpointError(f"{self.path}: neither {kind}.safetensors nor {SHARDING} (not a checkpoint)")
        meta = json.loads(sharding.read_text())
        if meta.get("format") != SHARDED_FORMAT:
            raise CheckpointError(f"{sharding}: unknown format {meta.get('format')!r}")
        self.layout, self.world_size = meta[kind], int(meta["world_size"])

    def keys(self) -> list[str]:
        return list(self._whole) if self.layout is None else list(self.layout)

    def _part(self, rank: int) -> dict[str, torch.Tensor]:
        if rank not in self._parts:
            f = self.path / shard_name(self.kind, rank, self.world_size)
            if not f.is_file():
                raise CheckpointError(f"{self.path}: part {f.name} is missing (incomplete sharded checkpoint)")
            self._parts[rank] = load_file(str(f))
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
        return {k: self.whole(k) for k in self.keys()}


def has_params(path: str | Path) -> bool:
    """Whether ``path`` holds model parameters (a full file or a sharded set)."""
    return (Path(path) / "model.safetensors").is_file() or (Path(path) / SHARDING).is_file()


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "trainer_state.json"
    if not f.is_file():
        raise CheckpointError(f"no checkpoint at {path}: trainer_state.json missing (give a checkpoint-<step> dir)")
    return json.loads(f.read_text())


def load_params(path: str | Path) -> dict[str, torch.Tensor]:
    """All trainable parameters, full (a sharded checkpoint is joined)."""
    return _Tensors(Path(path), "model").all()


def load_optimizer_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return _Tensors(Path(path), "optimizer").all()


def load_checkpoint(path: str | Path, model_params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore in place (plain or sharded parameters, from a full or sharded checkpoint); returns the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    saved = _Tensors(path, "model")
    missing = set(model_params) - set(saved.keys())
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks parameters {sorted(missing)[:3]}...: different model/LoRA setup")
    with torch.no_grad():
        for name, p in model_params.items():
            dist_utils.local(p).copy_(dist_utils.local(saved.like(name, p)).to(p.dtype))
    opt = _Tensors(path, "optimizer")
    tensors = {}
    for key in opt.keys():
        p = model_params.get(key.split("::", 1)[0])
        shaped_like_p = p is not None and dist_utils.is_sharded(p) and opt.shape(key) == list(p.shape)
        tensors[key] = opt.like(key, p if shaped_like_p else None)  # e.g. exp_avg sharded like p, step replicated
    optimizer_from_flat(optimizer, tensors, json.loads((path / "optimizer.json").read_text()))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    if restore_rng:
        _set_rng_state(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return state
