"""Turn a raw record into a conversation (or plain text) and then into text
spans that carry loss or not.

Supported record formats (``training_mode=instruction_finetuning``):
- ``messages``: ``[{"role": ..., "content": ...}]`` (OpenAI / HF chat);
- ``conversations``: ShareGPT ``[{"from": "human"|"gpt"|"system", "value": ...}]``;
- ``prompt`` / ``response``, ``question`` / ``answer``;
- a list of fields (``text_field=[instruction, input, output]``): the last
  field is the response, the others form the prompt.
``pretraining``: one text field (``text`` by default), all tokens carry loss.
Pre-tokenised (any mode, when ``text_field`` is not set): rows with
``input_ids`` and ``labels`` (same length, -100 where no loss) are used as
they are; this is how a Hugging Face ``Trainer`` run recorded by
:mod:`lmcleaner.integrations` stores the exact examples it trained on.

Rendering: the tokenizer's chat template when it has one. Otherwise the
documented plain template::

    System: {system}\n           (no loss)
    Question: {user}\n           (no loss)
    Answer: {assistant}</s>\n    (loss on " {assistant}</s>" only)

The space before the answer belongs to the answer so that byte-level BPE
tokenises the prompt ``...Answer:`` identically at training and generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "bot": "assistant", "model": "assistant"}
_PAIRS = [("prompt", "response"), ("question", "answer"), ("instruction", "output"), ("input", "output")]
PLAIN_ROLE_PREFIX = {"system": "System:", "user": "Question:", "assistant": "Answer:"}


class FormatError(ValueError):
    pass


def detect_format(columns: list[str], text_field: Any, training_mode: str) -> Any:
    """Decide how to read records; raises FormatError naming the missing field."""
    if not text_field and "input_ids" in columns and "labels" in columns:
        return ("tokens", None)
    if training_mode == "pretraining":
        field = text_field or "text"
        if field not in columns:
            raise FormatError(f"text_field '{field}' not in dataset columns {columns}: set training.text_field")
        return ("text", field)
    if isinstance(text_field, Sequence) and not isinstance(text_field, str):  # also OmegaConf's ListConfig
        missing = [f for f in text_field if f not in columns]
        if missing or len(text_field) < 2:
            raise FormatError(f"text_field {list(text_field)} needs >= 2 fields present in columns {columns}")
        return ("fields", list(text_field))
    if text_field:
        if text_field not in columns:
            raise FormatError(f"text_field '{text_field}' not in dataset columns {columns}: set training.text_field")
        if text_field in ("messages", "conversations"):
            return (text_field, text_field)
        for p, r in _PAIRS:
            if text_field == p and r in columns:
                return ("pair", (p, r))
        raise FormatError(f"text_field '{text_field}' is not a conversation or prompt field")
    for name in ("messages", "conversations"):
        if name in columns:
            return (name, name)
    for p, r in _PAIRS:
        if p in columns and r in columns:
            return ("pair", (p, r))
    raise FormatError(
        f"cannot find instruction fields in columns {columns}: expected messages, conversations, "
        "prompt/response or question/answer, or set training.text_field"
    )


def to_messages(record: dict, fmt: Any) -> list[Message] | str:
    kind, spec = fmt
    if kind == "text":
        return str(record[spec])
    if kind == "messages":
        return [{"role": m["role"], "content": str(m["content"])} for m in record[spec]]
    if kind == "conversations":
        out = []
        for turn in record[spec]:
            role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise FormatError(f"unknown ShareGPT speaker '{turn['from']}'")
            out.append({"role": role, "content": str(turn["value"])})
        return out
    if kind == "pair":
        p, r = spec
        return [{"role": "user", "content": str(record[p])}, {"role": "assistant", "content": str(record[r])}]
    fields = spec
    prompt = "\n".join(f"{f.capitalize()}: {record[f]}" for f in fields[:-1] if record[f] not in (None, ""))
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record[fields[-1]])}]


def plain_spans(messages: list[Message], eos: str) -> list[tuple[str, bool]]:
    spans: list[tuple[str, bool]] = []
    for m in messages:
        prefix = PLAIN_ROLE_PREFIX.get(m["role"], f"{m['role'].capitalize()}:")
        if m["role"] == "assistant":
            spans += [(prefix, False), (" " + m["content"] + eos, True), ("\n", False)]
        else:
            spans.append((prefix + " " + m["content"] + "\n", False))
    return spans


def template_spans(tokenizer, messages: list[Message]) -> list[tuple[str, bool]]:
    """Spans from the chat template, found by rendering growing prefixes.

    The template must be prefix-stable (rendering ``messages[:i]`` is a prefix
    of rendering ``messages[:i+1]``), which holds for common chat templates;
    otherwise we refuse rather than mask the wrong tokens.
    """
    spans: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if not head.startswith(done):
                raise FormatError("chat template is not prefix-stable; cannot locate assistant tokens")
            spans.append((head[len(done):], False))
            done = head
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(done):
            raise FormatError("chat template is not prefix-stable; cannot locate assistant tokens")
        spans.append((full[len(done):], m["role"] == "assistant"))
        done = full
    return spans


def prompt_text(tokenizer, question: str | list[Message]) -> str:
    """The generation prompt for a question, or for the conversation before the answer
    (a list of messages), rendered as training renders it (used by evaluation)."""
    messages = question if isinstance(question, list) else [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(text for text, _ in plain_spans(messages, tokenizer.eos_token or "")) + PLAIN_ROLE_PREFIX["assistant"]
