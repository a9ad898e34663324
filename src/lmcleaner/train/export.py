"""Export a model directory loadable with ``AutoModelForCausalLM.from_pretrained``."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

from .model import torch_dtype


def mergeable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain ``PreTrainedModel`` (LoRA merged) that does not alias ``model``."""
    clone = copy.deepcopy(model)
    if hasattr(clone, "merge_and_unload"):
        clone = clone.merge_and_unload()
    return clone


def export_model(model: torch.nn.Module, tokenizer, path: str | Path, save_precision: str = "float32") -> Path:
    """Write safetensors + config + tokenizer to ``path`` atomically (temp dir + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    plain = mergeable_copy(model).to(torch_dtype(save_precision))
    plain.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
