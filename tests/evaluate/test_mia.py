"""Membership-inference scores, rank AUC and privleak."""

import math
import zlib

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from lmcleaner.evaluate import mia
from lmcleaner.evaluate.scoring import TokenStats


def test_auc_matches_mann_whitney_with_ties():
    rng = np.random.default_rng(1)
    members = rng.integers(0, 5, size=40).astype(float)  # many ties
    nonmembers = rng.integers(0, 4, size=33).astype(float)
    u = mannwhitneyu(members, nonmembers, alternative="two-sided").statistic
    assert mia.auc(members, nonmembers) == pytest.approx(u / (40 * 33))


def test_auc_extremes_and_nan():
    assert mia.auc([3, 4], [1, 2]) == 1.0
    assert mia.auc([1, 2], [3, 4]) == 0.0
    assert mia.auc([1, 1], [1, 1]) == 0.5
    assert mia.auc([2, float("nan")], [1]) == 1.0
    assert math.isnan(mia.auc([], [1]))


def test_min_k_hand():
    lp = [-1.0, -5.0, -2.0, -0.5, -3.0]
    # k=0.4 -> int(5*0.4)=2 lowest: -5, -3
    assert mia.min_k_score(lp, 0.4) == pytest.approx(-4.0)
    assert mia.min_k_score(lp[:2], 0.1) == pytest.approx(-5.0)  # at least one token


def test_min_k_plus_plus_hand():
    lp, mu, sd = [-1.0, -3.0, -2.0], [-1.5, -1.0, -2.0], [0.5, 1.0, 2.0]
    # z = [1, -2, 0]; k=0.5 -> 1 lowest
    assert mia.min_k_plus_plus_score(lp, mu, sd, 0.5) == pytest.approx(-2.0)
    assert mia.min_k_plus_plus_score(lp, mu, sd, 1.0) == pytest.approx(-1 / 3)


def test_membership_scores_orientation_and_zlib():
    stats = TokenStats(logprobs=np.log([0.5, 0.25]), correct=np.array([True, False]),
                       vocab_mean=np.array([-1.0, -1.0]), vocab_std=np.array([1.0, 1.0]),
                       nll_sum=-float(np.log(0.125)))
    text = "an answer"
    sc = mia.membership_scores(stats, text, k=0.5)
    loss = -np.log(0.125) / 2
    assert sc["loss"] == pytest.approx(-loss)
    assert sc["zlib"] == pytest.approx(-loss / len(zlib.compress(text.encode())))
    assert sc["min_k"] == pytest.approx(np.log(0.25))
    assert sc["min_k_plus_plus"] == pytest.approx(np.log(0.25) + 1.0)


def test_privleak_muse_definition():
    # MUSE reports 1 - AUC: oracle AUC 0.5 -> 0.5; memorising model AUC 1.0 -> 0.0 -> -100 %
    assert mia.privleak(1.0, 0.5) == pytest.approx(-100.0)
    assert mia.privleak(0.5, 0.5) == pytest.approx(0.0)
    assert mia.privleak(0.4, 0.6) == pytest.approx(((1 - 0.4) - (1 - 0.6)) / (1 - 0.6) * 100)
    assert math.isnan(mia.privleak(0.7, 1.0))
