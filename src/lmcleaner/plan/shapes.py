"""The parameter shapes a run will train, without weights: the model is built on the meta device.

Sources, in order: an embedded preset (``tiny-llama``, ``tiny-mixtral`` with the
config's shape fields), a ``transformers`` config JSON file, a local model
directory (its ``config.json``), the table of known models (``known.py``), and
finally ``AutoConfig.from_pretrained`` (needs the hub; a one-line error names
the alternatives when it is out of reach). LoRA is applied with ``peft``
exactly as training does, so the trainable names, shapes and dtypes (peft
keeps adapters in float32 on a bf16 base) are the real ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..train.model import (
    EMBEDDED_CONFIGS,
    apply_lora,
    is_config_file,
    load_config_file,
    torch_dtype,
)
from .known import known_config, known_names


@dataclass
class ModelShape:
    name: str
    source: str
    architecture: str
    parameters: int  # all parameters of the model (LoRA: base + adapter)
    active_parameters: int  # per token (mixture of experts: only the routed experts)
    trainable: dict[str, tuple[tuple[int, ...], torch.dtype]]  # what the optimizer updates
    param_dtype: str
    experts: int = 0
    top_k: int = 0

    @property
    def trainable_parameters(self) -> int:
        n = 0
        for shape, _ in self.trainable.values():
            k = 1
            for d in shape:
                k *= d
            n += k
        return n

    def to_json(self) -> dict:
        return {"name": self.name, "source": self.source, "architecture": self.architecture,
                "parameters": self.parameters, "active_parameters": self.active_parameters,
                "trainable_parameters": self.trainable_parameters, "trainable_tensors": len(self.trainable),
                "param_dtype": self.param_dtype, "experts": self.experts or None, "top_k": self.top_k or None}


class PlanError(ValueError):
    """A one-line problem with the plan's input."""


def resolve_config(mcfg) -> tuple[object, str, str]:
    """``(transformers config, display name, source)`` for ``model.name_or_path``."""
    name = str(mcfg.name_or_path)
    if name in EMBEDDED_CONFIGS:
        from ..data import embedded_tokenizer

        tok = embedded_tokenizer()
        return EMBEDDED_CONFIGS[name](mcfg, len(tok), tok), name, "embedded preset"
    if is_config_file(name):
        return load_config_file(name, bool(mcfg.trust_remote_code)), name, "config file"
    if Path(name).is_dir():
        from transformers import AutoConfig

        from ..config.received import guard_remote_code

        if not (Path(name) / "config.json").is_file():
            raise PlanError(f"{name} has no config.json: give a model directory or a config JSON file")
        trust = guard_remote_code(name, bool(mcfg.trust_remote_code))  # shapes only, but never its code unasked
        return AutoConfig.from_pretrained(name, trust_remote_code=trust), name, "local directory"
    known = known_config(name)
    if known is not None:
        from transformers import AutoConfig

        canonical, fields = known
        model_type = fields.pop("model_type")
        return AutoConfig.for_model(model_type, **fields), canonical, \
            "known table (shapes typed from the public config.json)"
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name), name, "hub config"
    except Exception as err:  # noqa: BLE001 - offline, gated, unknown: all end in the same advice
        raise PlanError(f"cannot read the config of {name!r} ({type(err).__name__}); give a config.json path or a "
                        f"local model dir, or one of the known models {known_names()}") from None


def model_shape(mcfg, lora_cfg) -> ModelShape:
    """Build the model (and its LoRA) on the meta device and read its parameters."""
    from transformers import AutoModelForCausalLM

    config, name, source = resolve_config(mcfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config).to(torch_dtype(mcfg.dtype))
            arch = type(model).__name__
            if lora_cfg is not None and lora_cfg.enabled:
                model = apply_lora(model, lora_cfg)
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    experts = int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0)
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0) if experts else 0
    active = total
    if experts and top_k:
        expert_params = sum(p.numel() for n, p in named.items() if ".experts." in n and "lora_" not in n)
        active = total - expert_params + expert_params * top_k // experts
    trainable = {n: (tuple(p.shape), p.dtype) for n, p in named.items() if p.requires_grad}
    return ModelShape(name=name, source=source, architecture=arch, parameters=total, active_parameters=active,
                      trainable=trainable, param_dtype=mcfg.dtype, experts=experts, top_k=top_k)
