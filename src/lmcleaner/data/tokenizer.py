"""Tokenizers: the embedded offline one (shipped file) or ``AutoTokenizer``.

The embedded tokenizer is a byte-level BPE trained locally with HF
``tokenizers`` on the generated author corpus, so any text encodes (bytes
fallback) and nothing is downloaded. It carries a small chat template.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

ASSET = Path(__file__).parent / "assets" / "tokenizer.json"
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_embedded_tokenizer(texts: list[str], vocab_size: int = 1024, path: Path = ASSET) -> Path:
    """Train the byte-level BPE and save it (used to build the shipped asset)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def embedded_tokenizer() -> PreTrainedTokenizerFast:
    if not ASSET.is_file():
        from .synthetic import corpus_text

        train_embedded_tokenizer(corpus_text())
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSET), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL[3:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded, in one line naming the config key and what to check."""


def load_error(what: str, key: str, name: str, err: BaseException) -> ModelLoadError:
    """Turn a from_pretrained traceback (30 lines from the hub client) into one line."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200].rstrip(". ")
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.exists():
        return ModelLoadError(f"cannot load the {what} {key}={name!r}: no such directory; check the path")
    if local.exists():
        hint = "check that the directory holds config.json and the weights (and the tokenizer files)"
    else:
        hint = ("a hub id needs network access or a copy in the local cache (with HF_HUB_OFFLINE=1 only the cache is "
                "used); check the spelling, or give a local directory")
    return ModelLoadError(f"cannot load the {what} {key}={name!r}: {first}; {hint}")


def load_tokenizer(name_or_path: str | None, model_name: str = "tiny-llama",
                   trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """``embedded`` / ``None`` with an embedded tiny model, a model config file or a ``base:<preset>``:
    the shipped tokenizer; else ``AutoTokenizer`` (a tokenizer that ships Python code is refused
    unless ``trust_remote_code``)."""
    name = name_or_path or model_name
    if (name in ("embedded", "tiny-llama", "tiny-mixtral") or name.startswith("base:")  # base:<preset> is pretrained with it
            or (name_or_path is None and name.endswith(".json"))):  # a config file: fresh weights, no tokenizer
        return embedded_tokenizer()
    from ..config.received import guard_remote_code

    key = "model.tokenizer" if name_or_path else "model.name_or_path"
    trust = guard_remote_code(name, trust_remote_code, key=key)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, hub errors: one line naming the key
        raise load_error("tokenizer", key, name, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
