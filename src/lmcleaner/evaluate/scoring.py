"""Teacher-forced answer-token statistics.

Why one pass: answer probability, loss, exact memorisation, extraction
strength and the min-k% / min-k%++ / loss / zlib membership scores are all
functions of the same four per-token quantities at the supervised answer
positions (log-probability of the true token, whether it is the argmax, and
the mean / standard deviation of the log-probabilities under the model's own
next-token distribution). We compute them once per (question, answer) pair.

QA pairs are rendered with :func:`lmcleaner.data.encode_qa`, i.e. exactly
as training renders them: the supervised tokens are the assistant turn as the
training loss mask defines it (answer text plus the end-of-turn token(s) of
the chat template). Logits are taken in float32 whatever the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ..telemetry.progress import progress_bar

from ..train.loss import IGNORE_INDEX, per_sample_nll, shift_labels
from ..data import Collator, encode_qa


@dataclass
class TokenStats:
    """Per-answer-token statistics of one sample under one model.

    ``logprobs[t] = log p(y_t | x, y_<t)``; ``correct[t] = argmax p(. | x, y_<t) == y_t``;
    ``vocab_mean[t] = E_{v~p}[log p(v)]``, ``vocab_var[t]`` its variance and
    ``vocab_std[t] = sqrt(max(var, 1e-12))`` (min-k%++ normalisers); ``nll_sum`` from
    :func:`lmcleaner.train.loss.per_sample_nll` (the training loss convention).
    """

    logprobs: np.ndarray
    correct: np.ndarray
    vocab_mean: np.ndarray
    vocab_std: np.ndarray
    nll_sum: float
    vocab_var: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.logprobs.shape[0])

    @property
    def loss(self) -> float:
        """Mean answer-token NLL (NaN when no answer token survived truncation)."""
        return self.nll_sum / self.n if self.n else math.nan

    @property
    def prob(self) -> float:
        """TOFU answer probability ``exp(-mean NLL)`` (length-normalised)."""
        return math.exp(-self.loss) if self.n else math.nan


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def token_stats_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> list[TokenStats]:
    """Statistics per row of ``logits`` ``[B, T, V]`` for ``labels`` ``[B, T]``
    (unshifted, -100 where no loss; the causal shift is applied here)."""
    target = shift_labels(labels)
    mask = target != IGNORE_INDEX
    nll_sum, _ = per_sample_nll(logits, labels)
    # All supervised positions of the batch at once (row-major, so rows stay contiguous).
    lg = logits[mask].float()
    tgt = target[mask]
    logp = F.log_softmax(lg, dim=-1)
    lp = logp.gather(1, tgt[:, None])[:, 0]
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()
    lp_np = lp.double().cpu().numpy()
    correct = (lg.argmax(-1) == tgt).cpu().numpy()
    mu_np = mu.double().cpu().numpy()
    sd_np = var.clamp_min(1e-12).sqrt().double().cpu().numpy()
    var_np = var.double().cpu().numpy()
    counts = mask.sum(-1).tolist()
    out: list[TokenStats] = []
    start = 0
    for i, n in enumerate(counts):
        sl = slice(start, start + n)
        start += n
        out.append(TokenStats(logprobs=lp_np[sl], correct=correct[sl], vocab_mean=mu_np[sl],
                              vocab_std=sd_np[sl], nll_sum=float(nll_sum[i]), vocab_var=var_np[sl]))
    return out


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches, longest first, so padding (and peak memory) stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]


@torch.no_grad()
def score_items(model: torch.nn.Module, items: Sequence[dict], pad_token_id: int = 0, batch_size: int = 8,
                progress: bool = False, desc: str = "scoring") -> list[TokenStats]:
    """:class:`TokenStats` for encoded items (``input_ids``/``labels`` lists), in input order.

    ``model(input_ids=..., attention_mask=...)`` must return an object with a
    ``.logits`` attribute (any HF causal LM does).
    """
    model.eval()
    device = model_device(model)
    collate = Collator(pad_token_id)
    results: list[TokenStats | None] = [None] * len(items)
    batches = _batches([len(x["input_ids"]) for x in items], batch_size)
    for idx in progress_bar(batches, desc=desc, enabled=progress, leave=False):
        batch = collate([{**items[i], "sample_id": i} for i in idx])
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        for i, stats in zip(idx, token_stats_from_logits(logits, batch["labels"].to(logits.device))):
            results[i] = stats
    return results  # type: ignore[return-value]


def encode_pairs(tokenizer, questions: Sequence, answers: Sequence[str], max_length: int = 512) -> list[dict]:
    """(question, answer) pairs rendered as in training (loss on the answer only); a question
    may be the conversation before the answer (a list of messages)."""
    return [encode_qa(tokenizer, q if isinstance(q, list) else str(q), str(a), max_length)
            for q, a in zip(questions, answers)]


def pad_id(tokenizer) -> int:
    """Padding id: the tokenizer's pad token, else EOS, else 0."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def score_answers(model: torch.nn.Module, tokenizer, questions: Sequence[str], answers: Sequence[str],
                  max_length: int = 512, batch_size: int = 8, progress: bool = False,
                  desc: str = "scoring") -> list[TokenStats]:
    """Encode (question, answer) pairs and score them (see :func:`score_items`)."""
    items = encode_pairs(tokenizer, questions, answers, max_length)
    return score_items(model, items, pad_id(tokenizer), batch_size, progress, desc)
