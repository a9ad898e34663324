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


def load_tokenizer(name_or_path: str | None, model_name: str = "tiny-llama") -> PreTrainedTokenizerFast:
    """``embedded`` / ``None`` with an embedded tiny model or a model config file: the shipped
    tokenizer; else ``AutoTokenizer``."""
    name = name_or_path or model_name
    if name in ("embedded", "tiny-llama", "tiny-mixtral") or (name_or_path is None and str(name).endswith(".json")):
        return embedded_tokenizer()
    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
