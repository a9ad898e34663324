"""Metric definitions against hand-computed values and scipy."""

import math

import numpy as np
import pytest
from scipy.stats import hmean, ks_2samp

from lmcleaner.evaluate import metrics as M


def test_answer_probability_is_exp_minus_mean_nll():
    assert M.answer_probability(math.log(2)) == pytest.approx(0.5)


def test_truth_ratio_uses_length_normalised_geometric_mean():
    # base (paraphrase) per-token NLL 1.0; perturbed per-token NLLs 2.0 and 4.0
    tr = M.truth_ratio(1.0, [2.0, 4.0])
    # P_pert = exp(-(2+4)/2) = e^-3, P_base = e^-1  ->  TR = e^-2
    assert tr == pytest.approx(math.exp(-2.0))
    assert math.isnan(M.truth_ratio(1.0, []))


def test_truth_ratio_aggregates():
    trs = [0.5, 2.0, 0.25]
    assert M.truth_ratio_forget_score(trs) == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert M.truth_ratio_retain_score(trs) == pytest.approx((0.5 + 0.0 + 0.75) / 3)
    assert M.truth_ratio_forget_score([0.0]) == 0.0
    assert math.isnan(M.truth_ratio_retain_score([]))


def test_normalised_probability():
    # P(true) = 0.5, P(wrong) = 0.25 and 0.25 -> 0.5
    assert M.normalised_probability(math.log(2), [math.log(4), math.log(4)]) == pytest.approx(0.5)


@pytest.mark.parametrize("correct, expected", [
    ([True, True, True, True], 1.0),      # whole answer from the question alone
    ([False, True, True, True], 0.75),    # one token of prefix needed
    ([True, False, True, True], 0.5),     # k_min = 2
    ([True, True, True, False], 0.0),     # last token wrong: empty suffix only
    ([False, False, False, False], 0.0),
])
def test_extraction_strength(correct, expected):
    assert M.extraction_strength(correct) == pytest.approx(expected)


def test_extraction_strength_empty_is_nan():
    assert math.isnan(M.extraction_strength([]))


def test_exact_memorization():
    assert M.exact_memorization([True, False, True, True]) == pytest.approx(0.75)
    assert math.isnan(M.exact_memorization([]))


def test_forget_quality_is_ks_pvalue():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=30), rng.uniform(0.2, 1.2, size=25)
    assert M.forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    # invariant to TOFU's 1/TR orientation
    assert M.forget_quality(1 / a, 1 / b) == pytest.approx(ks_2samp(a, b).pvalue)
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    assert math.isnan(M.forget_quality([], b))


def test_model_utility_is_hmean():
    vals = [0.9, 0.4, 0.6, 0.7, 0.3, 0.55]
    assert M.model_utility(vals) == pytest.approx(hmean(vals))
    assert M.model_utility([0.5, 0.0, 0.9]) == 0.0
    assert math.isnan(M.model_utility([0.5, float("nan")]))
