"""Greedy generation and ROUGE-L recall.

Why left padding: a decoder continues from the last position of each row, so
prompts of different lengths must end at the same column; padding on the left
with an attention mask (HF ``generate`` derives position ids from the mask)
gives the same greedy tokens as generating each prompt alone, up to float
round-off. Prompts are rendered with :func:`lmcleaner.data.prompt_text` +
:func:`lmcleaner.data.encode_prompt`, exactly as training renders the
question, so the model sees the prompt it was trained to continue.

Generation stops at EOS, at the chat template's end-of-turn token(s)
(``<|end|>``, ``<|eot_id|>``, ``<|im_end|>``, ...) and at the model's own
``generation_config.eos_token_id``; the text is cut at the first stop token
and decoded without special tokens.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ..data import encode_prompt, prompt_text
from ..telemetry.progress import progress_bar
from .scoring import model_device, pad_id

END_OF_TURN_TOKENS = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eot|>")


def stop_token_ids(tokenizer, model: torch.nn.Module | None = None) -> list[int]:
    """EOS, end-of-turn special tokens present in the vocabulary, and the model's
    ``generation_config.eos_token_id`` (int or list)."""
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab:
            ids.append(int(vocab[tok]))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.extend(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(set(ids))


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` with prompts right-aligned (left padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int = 200,
                    batch_size: int = 8, pad_token_id: int = 0, stop_ids: Sequence[int] = (),
                    progress: bool = False, desc: str = "generating") -> list[list[int]]:
    """Greedy continuations (new token ids, cut before the first stop token), in input order."""
    model.eval()
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    stops = set(int(s) for s in stop_ids)
    for j in progress_bar(range(0, len(order), batch_size), desc=desc, enabled=progress, leave=False):
        idx = order[j:j + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad_token_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, eos_token_id=sorted(stops) or None, pad_token_id=pad_token_id,
            )
        new = gen[:, ids.shape[1]:].tolist()
        for i, toks in zip(idx, new):
            cut = next((t for t, tok in enumerate(toks) if tok in stops), len(toks))
            out[i] = toks[:cut]
    return out


def generate_answers(model: torch.nn.Module, tokenizer, questions: Sequence[str], max_new_tokens: int = 200,
                     batch_size: int = 8, progress: bool = False, desc: str = "generating") -> list[str]:
    """Greedy answers to ``questions`` as decoded text (special tokens removed, stripped)."""
    prompts = [encode_prompt(tokenizer, prompt_text(tokenizer, q if isinstance(q, list) else str(q)))
               for q in questions]
    tokens = greedy_generate(model, prompts, max_new_tokens, batch_size, pad_id(tokenizer),
                             stop_token_ids(tokenizer, model), progress, desc)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


_SCORER = None


def rouge_l_recall(references: Sequence[str], predictions: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each prediction against its reference (TOFU "ROUGE"):
    ``LCS(ref, pred) / len(ref)`` over stemmed word tokens
    (``rouge_score.RougeScorer(["rougeL"], use_stemmer=True)``)."""
    global _SCORER
    if _SCORER is None:
        import logging

        from rouge_score import rouge_scorer

        logging.getLogger("absl").setLevel(logging.WARNING)
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(_SCORER.score(str(ref), str(pred))["rougeL"].recall) for ref, pred in zip(references, predictions)]
