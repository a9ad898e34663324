"""Spans -> ``input_ids`` and ``labels`` (-100 where no loss).

The whole text is tokenised once and a token is supervised when any of its
characters lies in a supervised span; tokenising spans separately would split
BPE merges at span borders and give different ids than generation sees.
"""

from __future__ import annotations

from .labels import IGNORE_INDEX
from .formats import plain_spans, template_spans


def encode_spans(tokenizer, spans: list[tuple[str, bool]], max_length: int, add_bos: bool = True) -> dict:
    text = "".join(s for s, _ in spans)
    starts, pos = [], 0
    for s, sup in spans:
        starts.append((pos, pos + len(s), sup))
        pos += len(s)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    sup_ranges = [(a, b) for a, b, sup in starts if sup and b > a]
    labels = [
        tok_id if any(a < sb and b > sa for sa, sb in sup_ranges) else IGNORE_INDEX
        for tok_id, (a, b) in zip(ids, offsets)
    ]
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode_record(tokenizer, content, max_length: int) -> dict:
    """``content`` is a plain string (pretraining) or a list of messages."""
    if isinstance(content, str):
        eos = tokenizer.eos_token or ""
        return encode_spans(tokenizer, [(content + eos, True)], max_length)
    if getattr(tokenizer, "chat_template", None):
        spans = template_spans(tokenizer, content)
        # A template that renders BOS itself already starts with it.
        return encode_spans(tokenizer, spans, max_length, add_bos=not spans[0][0].startswith(tokenizer.bos_token or "\0"))
    return encode_spans(tokenizer, plain_spans(content, tokenizer.eos_token or ""), max_length)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a generation prompt, with BOS exactly as training adds it."""
    return encode_spans(tokenizer, [(prompt, False)], max_length=10**9,
                        add_bos=not prompt.startswith(tokenizer.bos_token or "\0"))["input_ids"]


def encode_qa(tokenizer, question, answer: str, max_length: int) -> dict:
    """A question (or the conversation before the answer, a list of messages) and an answer,
    rendered as in training, loss on the answer only."""
    context = question if isinstance(question, list) else [{"role": "user", "content": question}]
    return encode_record(tokenizer, [*context, {"role": "assistant", "content": answer}], max_length)
