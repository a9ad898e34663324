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
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "checkpoint-"


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
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_tensors(params), str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    write_json_atomic(tmp / "optimizer.json", opt_meta)
    write_json_atomic(tmp / "scheduler.json", scheduler.state_dict())
    rng_tensors, rng_meta = _rng_state()
    save_file(_tensors(rng_tensors), str(tmp / "rng.safetensors"))
    write_json_atomic(tmp / "rng.json", rng_meta)
    write_json_atomic(tmp / "trainer_state.json", trainer_state)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "trainer_state.json"
    if not f.is_file():
        raise CheckpointError(f"no checkpoint at {path}: trainer_state.json missing (give a checkpoint-<step> dir)")
    return json.loads(f.read_text())


def load_params(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def load_optimizer_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "optimizer.safetensors"))


def load_checkpoint(path: str | Path, model_params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore in place; returns the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    saved = load_params(path)
    missing = set(model_params) - set(saved)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks parameters {sorted(missing)[:3]}...: different model/LoRA setup")
    with torch.no_grad():
        for name, p in model_params.items():
            p.copy_(saved[name].to(p.dtype))
    optimizer_from_flat(optimizer, load_optimizer_tensors(path), json.loads((path / "optimizer.json").read_text()))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    if restore_rng:
        _set_rng_state(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return state
