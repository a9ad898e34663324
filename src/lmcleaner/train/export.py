"""Export a trained or unlearned model: a ``from_pretrained`` directory, or a LoRA adapter.

- :func:`export_model`: the whole model (LoRA merged into the base) for
  ``AutoModelForCausalLM.from_pretrained``.
- :func:`export_adapter`: only the LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained(base,
  dir)``, a few megabytes instead of the whole model.

Both write a temporary directory and rename it into place.
"""

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


def is_adapter_model(model: torch.nn.Module) -> bool:
    """A peft model whose adapter can be saved on its own."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _write_atomic(path: Path, write) -> Path:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def export_model(model: torch.nn.Module, tokenizer, path: str | Path, save_precision: str = "float32") -> Path:
    """Write safetensors + config + tokenizer to ``path`` atomically (temp dir + rename)."""
    def write(tmp: Path) -> None:
        plain = mergeable_copy(model).to(torch_dtype(save_precision))
        plain.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return _write_atomic(Path(path), write)


def export_adapter(model: torch.nn.Module, tokenizer, path: str | Path, save_precision: str = "float32",
                   base_model: str | None = None) -> Path:
    """Write the LoRA adapter of a peft ``model`` (safetensors) + tokenizer to ``path`` atomically.

    ``base_model`` is recorded as ``base_model_name_or_path`` in
    ``adapter_config.json`` (the model the adapter must be loaded onto).
    """
    if not is_adapter_model(model):
        raise ValueError("an adapter can only be exported from a LoRA run (lora.enabled=true); "
                         "use unlearn.export=merged")

    def write(tmp: Path) -> None:
        clone = copy.deepcopy(model)
        dtype = torch_dtype(save_precision)
        for p in clone.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
        if base_model is not None:
            for cfg in clone.peft_config.values():
                cfg.base_model_name_or_path = base_model
        # the vocabulary is never resized here: no embedding copy (and no hub lookup to find out)
        clone.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return _write_atomic(Path(path), write)
