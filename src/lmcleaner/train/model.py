"""Model construction: an embedded tiny model, a model built from a config file, or any HF causal LM, plus LoRA.

``model.name_or_path`` selects how:

- ``tiny-llama`` / ``tiny-mixtral``: built offline from a ``transformers``
  config with the shape fields of ``ModelConfig`` (the Mixtral variant adds
  ``num_local_experts`` experts, ``num_experts_per_tok`` of them per token);
- a ``*.json`` file holding a ``transformers`` config (``model_type`` names
  the architecture): built with fresh, seeded weights, no download (e.g. a
  ~100M Llama for a GPU check, or a known model's shape at small scale);
- anything else: ``AutoModelForCausalLM.from_pretrained`` (hub id or local dir).

Every randomly initialised model is built under ``seed``, so resume, replay
and unlearning rebuild identical weights (and the same frozen LoRA base).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MixtralConfig

EMBEDDED_MODEL = "tiny-llama"
EMBEDDED_MODELS = ("tiny-llama", "tiny-mixtral")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype '{name}': choose one of {list(_DTYPES)}")
    return _DTYPES[name]


def is_config_file(name_or_path: str) -> bool:
    return str(name_or_path).endswith(".json")


def _common(mcfg, vocab_size: int, tokenizer) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": mcfg.hidden_size,
        "intermediate_size": mcfg.intermediate_size,
        "num_hidden_layers": mcfg.num_hidden_layers,
        "num_attention_heads": mcfg.num_attention_heads,
        "num_key_value_heads": mcfg.num_key_value_heads,
        "max_position_embeddings": mcfg.max_position_embeddings,
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "pad_token_id": getattr(tokenizer, "pad_token_id", None),
        "tie_word_embeddings": False,
    }


def tiny_llama_config(mcfg, vocab_size: int, tokenizer=None) -> LlamaConfig:
    return LlamaConfig(**_common(mcfg, vocab_size, tokenizer))


def tiny_mixtral_config(mcfg, vocab_size: int, tokenizer=None) -> MixtralConfig:
    if mcfg.num_local_experts < 1 or not 1 <= mcfg.num_experts_per_tok <= mcfg.num_local_experts:
        raise ValueError(f"tiny-mixtral needs 1 <= model.num_experts_per_tok ({mcfg.num_experts_per_tok}) <= "
                         f"model.num_local_experts ({mcfg.num_local_experts})")
    return MixtralConfig(**_common(mcfg, vocab_size, tokenizer), num_local_experts=mcfg.num_local_experts,
                         num_experts_per_tok=mcfg.num_experts_per_tok, router_jitter_noise=0.0)


EMBEDDED_CONFIGS = {"tiny-llama": tiny_llama_config, "tiny-mixtral": tiny_mixtral_config}


def load_config_file(path: str | Path):
    """A ``transformers`` config from a JSON file (one-line errors)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"model config file not found: {p} (give a transformers config.json)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"cannot parse model config {p}: {err}") from None
    model_type = data.pop("model_type", None) if isinstance(data, dict) else None
    if not model_type:
        raise ValueError(f"model config {p} has no 'model_type' (e.g. \"llama\", \"mixtral\")")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ValueError(f"model config {p}: {str(err).splitlines()[0]}") from None


def build_model(mcfg, tokenizer, seed: int = 0, lora_cfg=None):
    """Build (seeded, so resume and replay rebuild identical frozen weights)."""
    dtype = torch_dtype(mcfg.dtype)
    if mcfg.name_or_path in EMBEDDED_CONFIGS or is_config_file(mcfg.name_or_path):
        if mcfg.name_or_path in EMBEDDED_CONFIGS:
            config = EMBEDDED_CONFIGS[mcfg.name_or_path](mcfg, len(tokenizer), tokenizer)
        else:
            config = load_config_file(mcfg.name_or_path)
            if getattr(config, "vocab_size", 0) < len(tokenizer):
                raise ValueError(f"{mcfg.name_or_path}: vocab_size={config.vocab_size} is smaller than the "
                                 f"tokenizer ({len(tokenizer)} tokens); raise it or set model.tokenizer")
        config._attn_implementation = mcfg.attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            mcfg.name_or_path, dtype=dtype, attn_implementation=mcfg.attn_implementation,
            trust_remote_code=mcfg.trust_remote_code,
        )
    if lora_cfg is not None and lora_cfg.enabled:
        model = apply_lora(model, lora_cfg, seed)
    return model


def apply_lora(model, lora_cfg, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return get_peft_model(model, LoraConfig(
            r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
            target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM",
        ))


def trainable_named_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
