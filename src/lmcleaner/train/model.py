"""Model construction: the embedded tiny Llama, or any HF causal LM, plus LoRA.

A model directory that ships Python code (``auto_map``) is loaded only when
the current user allowed it (``config.received.guard_remote_code``).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ..config.received import guard_remote_code
from ..data.tokenizer import load_error

EMBEDDED_MODEL = "tiny-llama"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype '{name}': choose one of {list(_DTYPES)}")
    return _DTYPES[name]


def tiny_llama_config(mcfg, vocab_size: int, tokenizer=None) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=mcfg.hidden_size,
        intermediate_size=mcfg.intermediate_size,
        num_hidden_layers=mcfg.num_hidden_layers,
        num_attention_heads=mcfg.num_attention_heads,
        num_key_value_heads=mcfg.num_key_value_heads,
        max_position_embeddings=mcfg.max_position_embeddings,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        tie_word_embeddings=False,
    )


def build_model(mcfg, tokenizer, seed: int = 0, lora_cfg=None):
    """Build (seeded, so resume and replay rebuild identical frozen weights)."""
    dtype = torch_dtype(mcfg.dtype)
    if mcfg.name_or_path == EMBEDDED_MODEL:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            config = tiny_llama_config(mcfg, len(tokenizer), tokenizer)
            config._attn_implementation = mcfg.attn_implementation
            model = LlamaForCausalLM(config).to(dtype)
    else:
        from .pretrain import resolve_base

        path = resolve_base(mcfg.name_or_path)
        trust = guard_remote_code(path, bool(mcfg.trust_remote_code))  # before transformers sees it
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=mcfg.attn_implementation, trust_remote_code=trust,
            )
        except Exception as err:  # noqa: BLE001 - one line naming model.name_or_path instead of 30
            raise load_error("model", "model.name_or_path", mcfg.name_or_path, err) from None
    if lora_cfg is not None and lora_cfg.enabled:
        model = apply_lora(model, lora_cfg, seed)
    return model


class LoraTargetError(ValueError):
    """``lora.target_modules`` matches nothing in the model (one line, listing what exists)."""


def linear_module_names(model) -> list[str]:
    """Short names of the model's linear layers (``nn.Linear`` and GPT-2's ``Conv1D``), the LoRA candidates."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D)) and name and not name.endswith("lm_head")})


def default_lora_targets(model) -> list[str] | str:
    """peft's known targets for the model type, else every linear layer."""
    from peft.utils import constants

    table = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    known = table.get(getattr(getattr(model, "config", None), "model_type", None))
    return list(known) if known else "all-linear"


def apply_lora(model, lora_cfg, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    targets = list(lora_cfg.target_modules) if lora_cfg.target_modules else default_lora_targets(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        try:
            return get_peft_model(model, LoraConfig(
                r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                target_modules=targets, task_type="CAUSAL_LM",
            ))
        except ValueError as err:
            first = (str(err).strip().splitlines() or ["no module matched"])[0].rstrip(". ")
            raise LoraTargetError(f"lora.target_modules={targets} does not fit this model ({first}); its linear "
                                  f"modules are {linear_module_names(model)}") from None


def trainable_named_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
