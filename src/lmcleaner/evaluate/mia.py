"""Membership-inference attacks (forget = members vs holdout = non-members).

Convention used everywhere here: an attack gives a *membership score*, and a
higher score means "more likely a training member". The published attacks
are usually written as non-membership scores (a loss); we negate them, so:

- ``loss``:   ``-mean NLL`` of the answer tokens (Yeom et al. 2018);
- ``zlib``:   ``-mean NLL / len(zlib.compress(answer_text))`` (Carlini et al.
  2021: loss relative to the text's zlib entropy, in bytes);
- ``min_k``:  mean of the lowest ``k``-fraction of answer-token log-probs
  (Min-K% Prob, Shi et al. 2024), ``k = 0.4`` by default as in MUSE;
- ``min_k_plus_plus``: the same over ``(log p(y_t) - mu_t) / sigma_t`` with
  ``mu_t, sigma_t`` the mean / std of ``log p(v)`` under the model's own
  next-token distribution (Min-K%++, Zhang et al. 2024).

``number of tokens kept = max(1, int(n * k))`` as in the reference code.

AUC = P(score(member) > score(non-member)) + 0.5 P(tie): the Mann-Whitney U
statistic divided by ``n_members * n_nonmembers``, with average ranks for ties
(identical to ``sklearn.metrics.roc_auc_score`` with members labelled 1).
0.5 = the attack cannot tell forget from holdout; 1 = it always can.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata

from .conventions import LMCLEANER, Convention, get_convention
from .scoring import TokenStats

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")


def zlib_length(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (the attack's entropy proxy)."""
    return len(zlib.compress(text.encode("utf-8")))


def _lowest_mean(values: np.ndarray, k: float) -> float:
    if values.size == 0:
        return math.nan
    n_k = max(1, int(values.size * k))
    return float(np.mean(np.sort(values)[:n_k]))


def min_k_score(logprobs: Sequence[float], k: float = 0.4) -> float:
    """Min-K% Prob membership score: mean of the lowest ``k`` fraction of token log-probs."""
    return _lowest_mean(np.asarray(logprobs, dtype=np.float64), k)


def min_k_plus_plus_score(logprobs: Sequence[float], vocab_mean: Sequence[float], vocab_std: Sequence[float],
                          k: float = 0.4) -> float:
    """Min-K%++ membership score: Min-K% over ``(log p(y_t) - mu_t) / sigma_t``."""
    lp = np.asarray(logprobs, dtype=np.float64)
    z = (lp - np.asarray(vocab_mean, dtype=np.float64)) / np.maximum(np.asarray(vocab_std, dtype=np.float64), 1e-6)
    return _lowest_mean(z, k)


def membership_scores(stats: TokenStats, answer_text: str, k: float = 0.4,
                      convention: str | Convention | None = None) -> dict[str, float]:
    """All attack scores for one sample (higher = more likely member).

    ``answer_text``: what zlib compresses (the caller passes the decoded supervised
    tokens under the open-unlearning convention). open-unlearning scores Min-K% and
    Min-K%++ on the answer tokens but the last, floors the Min-K%++ variance at
    1e-6, and scores 0 when no token is left.
    """
    if stats.n == 0:
        return {name: math.nan for name in ATTACKS}
    conv = get_convention(convention)
    out = {"loss": -stats.loss, "zlib": -stats.loss / zlib_length(answer_text)}
    lp, mu = conv.scored(stats.logprobs), conv.scored(stats.vocab_mean)
    if lp.size == 0:
        return {**out, "min_k": 0.0, "min_k_plus_plus": 0.0}
    if conv.name == LMCLEANER:
        std = stats.vocab_std
    else:
        var = stats.vocab_var if stats.vocab_var is not None else np.square(stats.vocab_std)
        std = np.sqrt(np.maximum(conv.scored(var), conv.min_k_pp_var_floor))
    return {**out, "min_k": min_k_score(lp, k), "min_k_plus_plus": min_k_plus_plus_score(lp, mu, std, k)}


def auc(member_scores: Iterable[float], nonmember_scores: Iterable[float]) -> float:
    """ROC AUC by ranks (Mann-Whitney U / (n1 n0)); ties count one half. NaN scores are dropped."""
    pos = np.asarray(list(member_scores), dtype=np.float64)
    neg = np.asarray(list(nonmember_scores), dtype=np.float64)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    n1, n0 = pos.size, neg.size
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks for ties
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def privleak(auc_model: float, auc_oracle: float, eps: float = 0.0) -> float:
    """MUSE PrivLeak in percent, ``(AUC'_model - AUC'_oracle) / AUC'_oracle * 100``.

    MUSE reports AUCs as ``AUC' = 1 - AUC`` of the conventional attack AUC above
    (open-unlearning ``privleak`` applies the same ``1 - x``), so with our AUC:
    ``privleak = (AUC_oracle - AUC_model) / (1 - AUC_oracle) * 100``.
    0 = leaks exactly as much as the exact-retrain model; strongly negative
    (towards -100) = under-unlearned, the forget set is still recognisable as
    training data; positive = over-unlearned (forget set looks *less* member-like
    than unseen data, itself a signal). NaN when ``AUC_oracle = 1``.
    """
    ref = 1.0 - auc_oracle
    if not (math.isfinite(auc_model) and math.isfinite(auc_oracle)) or ref + eps <= 0:
        return math.nan
    return ((1.0 - auc_model) - ref) / (ref + eps) * 100.0
