"""Shapes of well-known models, for ``lmcleaner plan`` where their config cannot be downloaded.

Typed in by hand from the public ``config.json`` of each model on the Hugging
Face hub (only the fields that decide parameter shapes; rope scaling, token
ids and the like are left out because they do not change any size). The
parameter count that ``transformers`` builds from each entry is checked in
the tests against the count the model card publishes. A config that can be
read (``--model path/to/config.json`` or a local model directory) always
wins over this table.
"""

from __future__ import annotations

from typing import Any

_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "max_position_embeddings": 131072, "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False}

#: hub id -> config fields (source: https://huggingface.co/<hub id>/blob/main/config.json)
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.2-1B": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192,
                                "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "head_dim": 64, "tie_word_embeddings": True},
    "meta-llama/Llama-3.2-3B": {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192,
                                "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                                "head_dim": 128, "tie_word_embeddings": True},
    "meta-llama/Llama-3.1-8B": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "head_dim": 128, "tie_word_embeddings": False},
    "Qwen/Qwen2.5-0.5B": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                          "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                          "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                          "tie_word_embeddings": True},
    "mistralai/Mixtral-8x7B-v0.1": {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
                                    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                    "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
                                    "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                                    "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
}

#: published total parameter counts (what ``transformers`` builds from the fields above)
PUBLISHED_PARAMETERS = {
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
}

# Instruct variants share the base shapes.
_ALIASES = {"meta-llama/Llama-3.2-1B-Instruct": "meta-llama/Llama-3.2-1B",
            "meta-llama/Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B",
            "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
            "meta-llama/Meta-Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
            "Qwen/Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B",
            "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistralai/Mixtral-8x7B-v0.1"}


def known_config(name: str) -> tuple[str, dict[str, Any]] | None:
    """``(canonical hub id, fields)`` for a known model (case-insensitive, with or without the org)."""
    table = {k.lower(): k for k in [*KNOWN_CONFIGS, *_ALIASES]}
    key = table.get(name.lower())
    if key is None:
        short = {k.split("/")[-1].lower(): k for k in [*KNOWN_CONFIGS, *_ALIASES]}
        key = short.get(name.lower())
    if key is None:
        return None
    canonical = _ALIASES.get(key, key)
    return canonical, dict(KNOWN_CONFIGS[canonical])


def known_names() -> list[str]:
    return list(KNOWN_CONFIGS)
