"""Per-sample and aggregate forgetting / utility metrics (pure functions).

Definitions follow the reference implementations (TOFU's
``aggregate_stat_eval.py`` and open-unlearning ``src/evals/metrics``), so the
numbers are comparable with published tables. Where the paper formula and the
reference code differ, the code is followed and the difference is noted.

All "probabilities" of an answer ``a`` (``n`` supervised tokens) are
length-normalised: ``P(a)^(1/n) = exp(-mean token NLL)``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import hmean, ks_2samp

from .conventions import Convention, extraction_strength_ou, get_convention


def answer_probability(mean_nll: float) -> float:
    """TOFU "Prob.": ``exp(-mean answer-token NLL)``, i.e. the geometric mean of
    the per-token probabilities ``P(a|q)^(1/|a|)``."""
    return math.exp(-mean_nll)


def truth_ratio(base_loss: float, perturbed_losses: Sequence[float], eps: float = 0.0) -> float:
    """TOFU truth ratio ``TR = P_pert / P_base`` with length-normalised probabilities.

    ``P_base = exp(-base_loss)`` (the paraphrased answer on forget/retain, the
    answer itself on real_authors / world_facts) and
    ``P_pert = exp(-mean_j perturbed_loss_j)``, i.e. the *geometric* mean over
    the perturbed answers of ``P(a_j)^(1/|a_j|)``. This is what TOFU's code
    (``np.exp(perturbed.mean(-1) - paraphrased)``, inverted) and open-unlearning
    (``truth_ratio``) compute; the paper writes an arithmetic mean. TR near 0:
    the model prefers the true answer; TR near 1: it cannot tell them apart.
    ``eps`` > 0: open-unlearning's ``P_pert / (P_base + eps)``.
    """
    if not perturbed_losses:
        return math.nan
    if eps:
        return math.exp(-float(np.mean(perturbed_losses))) / (math.exp(-float(base_loss)) + eps)
    return math.exp(float(base_loss) - float(np.mean(perturbed_losses)))


def truth_ratio_forget_score(ratios: Iterable[float], eps: float = 0.0) -> float:
    """Forget-set aggregate ``mean(min(TR, 1/TR))`` (1 = true and false answers equally
    likely, as for a model that never saw the data); ``eps``: ``1/(TR + eps)`` (open-unlearning)."""
    tr = _finite(ratios)
    if tr.size == 0:
        return math.nan
    with np.errstate(divide="ignore"):
        return float(np.mean(np.minimum(tr, 1.0 / (tr + eps))))


def truth_ratio_retain_score(ratios: Iterable[float]) -> float:
    """Retain / general-knowledge aggregate ``mean(max(0, 1 - TR))`` (higher = the
    model prefers the true answer)."""
    tr = _finite(ratios)
    if tr.size == 0:
        return math.nan
    return float(np.mean(np.maximum(0.0, 1.0 - tr)))


def normalised_probability(true_loss: float, perturbed_losses: Sequence[float], eps: float = 0.0) -> float:
    """TOFU real-authors / world-facts "Prob.": ``P(a) / (P(a) + sum_j P(a_j) + eps)`` with
    length-normalised probabilities (the correct option against the wrong ones)."""
    p_true = math.exp(-true_loss)
    p_wrong = float(np.sum(np.exp(-np.asarray(perturbed_losses, dtype=np.float64))))
    return p_true / (p_true + p_wrong + eps)


def exact_memorization(correct: Sequence[bool], convention: str | Convention | None = None) -> float:
    """Fraction of answer tokens that are the teacher-forced argmax (Tirumala et al.
    2022; open-unlearning ``exact_memorization``, which leaves out the last answer
    token). NaN with no scored token."""
    c = get_convention(convention).scored(np.asarray(correct, dtype=bool))
    return float(c.mean()) if c.size else math.nan


def extraction_strength(correct: Sequence[bool], convention: str | Convention | None = None) -> float:
    """Extraction strength (Carlini et al. 2021 style; Wang et al. 2025, open-unlearning
    ``extraction_strength``), teacher-forced:

    ``ES = 1 - k_min / n`` where ``k_min`` is the smallest prefix length ``k`` such
    that every answer token from position ``k`` on is the argmax given the true
    prefix. ES = 1: the whole answer is reproduced from the question alone;
    ES = 0: not even the last token is (``k_min = n``, the empty suffix).
    open-unlearning stops its search at ``k = n-1`` and so reports ``1/n``
    instead of 0 when the last token is wrong, and leaves out the last answer token;
    ``convention="open-unlearning"`` does both.
    """
    conv = get_convention(convention)
    c = conv.scored(np.asarray(correct, dtype=bool))
    if conv.es_floor:
        return extraction_strength_ou(c)
    n = int(c.size)
    if n == 0:
        return math.nan
    k = n
    while k > 0 and c[k - 1]:
        k -= 1
    return 1.0 - k / n


def forget_quality(model_truth_ratios: Iterable[float], oracle_truth_ratios: Iterable[float]) -> float:
    """TOFU forget quality: p-value of the two-sample Kolmogorov-Smirnov test
    (``scipy.stats.ks_2samp``) between the per-sample forget-set truth ratios of
    the evaluated model and of the exact-retrain oracle. High (near 1) = the
    two distributions are indistinguishable. KS is invariant to monotone maps,
    so using ``TR`` or TOFU's ``1/TR`` gives the same p-value."""
    a, b = _finite(model_truth_ratios), _finite(oracle_truth_ratios)
    if a.size == 0 or b.size == 0:
        return math.nan
    return float(ks_2samp(a, b).pvalue)


def model_utility(components: Sequence[float]) -> float:
    """TOFU model utility: harmonic mean (``scipy.stats.hmean``) of the retain /
    real-authors / world-facts Prob., ROUGE-L and truth-ratio figures. Any
    component at 0 makes it 0; NaN components make it NaN."""
    vals = np.asarray(list(components), dtype=np.float64)
    if vals.size == 0 or not np.all(np.isfinite(vals)):
        return math.nan
    if np.any(vals <= 0):
        return 0.0
    return float(hmean(vals))


def nanmean(values: Iterable[float]) -> float:
    """Mean over the finite values (NaN when there are none)."""
    v = _finite(values)
    return float(v.mean()) if v.size else math.nan


def _finite(values: Iterable[float]) -> np.ndarray:
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]
