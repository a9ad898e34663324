"""Export a trained or unlearned model: a ``from_pretrained`` directory, or a LoRA adapter.

- :func:`export_model`: the whole model (LoRA merged into the base) for
  ``AutoModelForCausalLM.from_pretrained``.
- :func:`export_adapter`: only the LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained(base,
  dir)``, a few megabytes instead of the whole model.

Both write a temporary directory and rename it into place (``outputs.AtomicDir``);
``write_model_files``/``write_adapter_files`` fill a directory the caller
reserved (``unlearn.session``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
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


def is_adapter_model(model: torch.nn.Module) -> bool:
    """A peft model whose adapter can be saved on its own."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


@contextlib.contextmanager
def _os_errors(directory: str | Path) -> Iterator[None]:
    """A full disk or a read-only output, reported by ``save_pretrained`` in its own words,
    becomes an ``OSError`` naming ``directory``."""
    try:
        yield
    except Exception as err:
        os_err = as_os_error(err, directory)
        if os_err is None:
            raise
        raise os_err from None


def write_model_files(model: torch.nn.Module, tokenizer, directory: str | Path,
                      save_precision: str = "float32") -> Path:
    """safetensors + config + tokenizer into an existing (temporary) directory."""
    plain = mergeable_copy(model).to(torch_dtype(save_precision))
    with _os_errors(directory):
        plain.save_pretrained(str(directory), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
    return Path(directory)


def write_adapter_files(model: torch.nn.Module, tokenizer, directory: str | Path, save_precision: str = "float32",
                        base_model: str | None = None) -> Path:
    """The LoRA adapter of a peft ``model`` (safetensors) + tokenizer into an existing (temporary) directory.

    ``base_model`` is recorded as ``base_model_name_or_path`` in
    ``adapter_config.json`` (the model the adapter must be loaded onto).
    """
    if not is_adapter_model(model):
        raise ValueError("an adapter can only be exported from a LoRA run (lora.enabled=true); "
                         "use unlearn.export=merged")
    clone = copy.deepcopy(model)
    dtype = torch_dtype(save_precision)
    for p in clone.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    if base_model is not None:
        for cfg in clone.peft_config.values():
            cfg.base_model_name_or_path = base_model
    with _os_errors(directory):
        # the vocabulary is never resized here: no embedding copy (and no hub lookup to find out)
        clone.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
    return Path(directory)


def export_model(model: torch.nn.Module, tokenizer, path: str | Path, save_precision: str = "float32") -> Path:
    """Write safetensors + config + tokenizer to ``path`` atomically (temp dir + rename;
    a failure removes the temp dir, an existing ``path`` is replaced only at the end)."""
    with AtomicDir(path) as out:
        write_model_files(model, tokenizer, out.tmp, save_precision)
        return out.commit()


def export_adapter(model: torch.nn.Module, tokenizer, path: str | Path, save_precision: str = "float32",
                   base_model: str | None = None) -> Path:
    """Write the LoRA adapter (:func:`write_adapter_files`) to ``path`` atomically, as :func:`export_model`."""
    with AtomicDir(path) as out:
        write_adapter_files(model, tokenizer, out.tmp, save_precision, base_model)
        return out.commit()
