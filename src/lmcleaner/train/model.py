"""Model construction: an embedded tiny model, a model built from a config file, or any HF causal LM, plus LoRA.

``model.name_or_path`` selects how:

- ``tiny-llama`` / ``tiny-mixtral``: built offline from a ``transformers``
  config with the shape fields of ``ModelConfig`` (the Mixtral variant adds
  ``num_local_experts`` experts, ``num_experts_per_tok`` of them per token);
- a ``*.json`` file holding a ``transformers`` config (``model_type`` names
  the architecture): built with fresh, seeded weights, no download (e.g. a
  ~100M Llama for a GPU check, or a known model's shape at small scale);
- ``base:<preset>``: the project's pretrained base (``train.pretrain``, built
  and cached on first use);
- anything else: ``AutoModelForCausalLM.from_pretrained`` (hub id or local dir).

A model directory or config file that ships Python code (``auto_map``) is
loaded only when the current user allowed it
(``config.received.guard_remote_code``); load failures are one line naming
``model.name_or_path``.

Every randomly initialised model is built under ``seed``, so resume, replay
and unlearning rebuild identical weights (and the same frozen LoRA base).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MixtralConfig

from ..config.received import guard_remote_code
from ..data.tokenizer import load_error

EMBEDDED_MODEL = "tiny-llama"
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


def load_config_file(path: str | Path, trust_remote_code: bool = False):
    """A ``transformers`` config from a JSON file (one-line errors); one that maps classes to
    shipped code (``auto_map``) is refused unless ``trust_remote_code`` (the current user's)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"model config file not found: {p} (give a transformers config.json)")
    guard_remote_code(p, trust_remote_code)  # before transformers sees it
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot parse model config {p}: {str(err).splitlines()[0]}") from None
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
            config = load_config_file(mcfg.name_or_path, bool(mcfg.trust_remote_code))
            if getattr(config, "vocab_size", 0) < len(tokenizer):
                raise ValueError(f"{mcfg.name_or_path}: vocab_size={config.vocab_size} is smaller than the "
                                 f"tokenizer ({len(tokenizer)} tokens); raise it or set model.tokenizer")
        config._attn_implementation = mcfg.attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = AutoModelForCausalLM.from_config(
                    config, trust_remote_code=bool(mcfg.trust_remote_code)).to(dtype)
            except (ValueError, ImportError, OSError) as err:  # one line naming the key, not a traceback
                raise load_error("model", "model.name_or_path", mcfg.name_or_path, err) from None
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
