"""Teacher-forced statistics on a model whose logits are set by hand."""

import math

import numpy as np
import pytest
import torch

from lmcleaner.evaluate import metrics as M
from lmcleaner.evaluate.mia import membership_scores
from lmcleaner.evaluate.scoring import score_items, token_stats_from_logits

# next-token distributions of a 3-token vocabulary, one row per current token
P = torch.tensor([[0.6, 0.2, 0.2],
                  [0.2, 0.3, 0.5],
                  [0.25, 0.25, 0.5]])
# prompt token 0, answer tokens 1 2 1 (token 0 carries no loss)
ITEM = {"input_ids": [0, 1, 2, 1], "labels": [-100, 1, 2, 1]}


def test_token_stats_hand_computed(bigram):
    model = bigram(P.log())
    (st,) = score_items(model, [ITEM])
    # predictions: after 0 -> 1 (p .2, argmax 0), after 1 -> 2 (p .5, argmax 2), after 2 -> 1 (p .25, argmax 2)
    np.testing.assert_allclose(st.logprobs, np.log([0.2, 0.5, 0.25]), rtol=1e-6)
    assert st.correct.tolist() == [False, True, False]
    assert st.n == 3
    assert st.loss == pytest.approx(-np.log(0.2 * 0.5 * 0.25) / 3, rel=1e-6)
    assert st.prob == pytest.approx((0.2 * 0.5 * 0.25) ** (1 / 3), rel=1e-6)
    assert M.exact_memorization(st.correct) == pytest.approx(1 / 3)
    assert M.extraction_strength(st.correct) == 0.0
    # min-k++ normalisers: mean / std of log p under p
    for row, tok in zip((0, 1, 2), range(3)):
        p = P[row].double().numpy()
        mu = (p * np.log(p)).sum()
        sd = math.sqrt((p * np.log(p) ** 2).sum() - mu ** 2)
        assert st.vocab_mean[tok] == pytest.approx(mu, rel=1e-5)
        assert st.vocab_std[tok] == pytest.approx(sd, rel=1e-4)


def test_extraction_strength_through_a_model(bigram):
    # answer 2 2 2 after prompt 1: after 1 -> 2 (argmax), after 2 -> 2 (argmax): fully extractable
    (st,) = score_items(bigram(P.log()), [{"input_ids": [0, 1, 2, 2, 2], "labels": [-100, -100, 2, 2, 2]}])
    assert st.correct.tolist() == [True, True, True]
    assert M.extraction_strength(st.correct) == 1.0
    # answer 1 2 2 after prompt 0: first token wrong, rest argmax -> k_min = 1, ES = 2/3
    (st,) = score_items(bigram(P.log()), [{"input_ids": [0, 1, 2, 2], "labels": [-100, 1, 2, 2]}])
    assert M.extraction_strength(st.correct) == pytest.approx(2 / 3)


def test_batched_scoring_equals_one_by_one(bigram):
    model = bigram(torch.randn(5, 5))
    items = [{"input_ids": [0, 1, 2, 3, 4, 1][:n], "labels": [-100, -100, 2, 3, 4, 1][:n]} for n in (3, 6, 4, 5)]
    batched = score_items(model, items, batch_size=3)
    single = [score_items(model, [x])[0] for x in items]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-6)
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-6)


def test_no_supervised_token_gives_nan(bigram):
    (st,) = score_items(bigram(P.log()), [{"input_ids": [0, 1], "labels": [-100, -100]}])
    assert st.n == 0 and math.isnan(st.loss) and math.isnan(st.prob)
    assert all(math.isnan(v) for v in membership_scores(st, "x").values())


def test_logits_are_float32_even_for_half_models():
    logits = P.log().to(torch.bfloat16)[torch.tensor([[0, 1, 2, 1]])]
    (st,) = token_stats_from_logits(logits, torch.tensor([ITEM["labels"]]))
    assert st.logprobs.dtype == np.float64
    np.testing.assert_allclose(st.logprobs, np.log([0.2, 0.5, 0.25]), rtol=2e-2)
