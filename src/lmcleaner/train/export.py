"""Export a model directory loadable with ``AutoModelForCausalLM.from_pretrained``."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .model import torch_dtype
from .outputs import AtomicDir, as_os_error


def mergeable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain ``PreTrainedModel`` (LoRA merged) that does not alias ``model``."""
    clone = copy.deepcopy(model)
    if hasattr(clone, "merge_and_unload"):
        clone = clone.merge_and_unload()
    return clone


def write_model_files(model: torch.nn.Module, tokenizer, directory: str | Path,
                      save_precision: str = "float32") -> Path:
    """safetensors + config + tokenizer into an existing (temporary) directory."""
    plain = mergeable_copy(model).to(torch_dtype(save_precision))
    try:
        plain.save_pretrained(str(directory), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
    except Exception as err:
        os_err = as_os_error(err, directory)
        if os_err is None:
            raise
        raise os_err from None
    return Path(directory)


def export_model(model: torch.nn.Module, tokenizer, path: str | Path, save_precision: str = "float32") -> Path:
    """Write safetensors + config + tokenizer to ``path`` atomically (temp dir + rename;
    a failure removes the temp dir, an existing ``path`` is replaced only at the end)."""
    with AtomicDir(path) as out:
        write_model_files(model, tokenizer, out.tmp, save_precision)
        return out.commit()
