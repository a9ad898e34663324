"""Parameter distance and KL to the oracle."""

import math

import numpy as np
import pytest
import torch

from lmcleaner.evaluate.fidelity import ParameterMismatchError, kl_to_oracle, param_distance, relative_param_error


def _linear(w, b):
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
        lin.bias.copy_(torch.tensor([b]))
    return lin


def test_param_distance_and_relative_error():
    oracle, original, model = _linear([0.0, 0.0], 0.0), _linear([3.0, 0.0], 4.0), _linear([0.0, 0.6], 0.8)
    assert param_distance(original, oracle) == pytest.approx(5.0)
    assert relative_param_error(model, oracle, original) == pytest.approx(1.0 / 5.0)
    assert relative_param_error(oracle, oracle, original) == 0.0
    assert math.isnan(relative_param_error(model, oracle, oracle))


def test_param_distance_accumulates_in_float64():
    a = torch.nn.Linear(1000, 1000, bias=False)
    b = torch.nn.Linear(1000, 1000, bias=False)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(1.0)
        b.weight[0, 0] += 1e-3
    assert param_distance(a, b) == pytest.approx(1e-3, rel=1e-3)


def test_param_mismatch_is_reported():
    with pytest.raises(ParameterMismatchError, match="shape"):
        param_distance(torch.nn.Linear(2, 1), torch.nn.Linear(3, 1))
    with pytest.raises(ParameterMismatchError, match="different parameters"):
        param_distance(torch.nn.Linear(2, 1), torch.nn.Linear(2, 1, bias=False))


def test_kl_hand_computed(bigram):
    po = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    pm = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    oracle, model = bigram(po.log()), bigram(pm.log())
    items = [{"input_ids": [0, 1, 0], "labels": [-100, 1, 0]},   # positions with tokens 0 and 1
             {"input_ids": [1, 1], "labels": [-100, 1]}]          # position with token 1
    sums, counts = kl_to_oracle(model, oracle, items, batch_size=2)

    def kl(p, q):
        return float((p * (p / q).log()).sum())

    k0, k1 = kl(po[0], pm[0]), kl(po[1], pm[1])
    assert counts == [2, 1]
    assert sums[0] == pytest.approx(k0 + k1, rel=1e-5)
    assert sums[1] == pytest.approx(k1, rel=1e-5)
    _, self_counts = kl_to_oracle(oracle, oracle, items)
    np.testing.assert_allclose(kl_to_oracle(oracle, oracle, items)[0], [0.0, 0.0], atol=1e-7)
    assert self_counts == counts


def test_kl_to_oracle_is_not_negative_for_nearly_identical_models():
    """KL of two models whose logits differ at float32 rounding level: the sum of
    ``p (log p - log q)`` in float32 came out negative (a negative KL ratio in the regime
    benchmark); in float64 it is >= 0 as KL must be."""
    import torch

    from lmcleaner.evaluate.fidelity import kl_to_oracle

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.table = logits

        def forward(self, input_ids, attention_mask=None):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.table[: input_ids.shape[0], : input_ids.shape[1]])

    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 12, 1000, generator=g) * 8
    near = base + torch.randn(base.shape, generator=g) * 1e-5
    items = [{"input_ids": list(range(1, 13)), "labels": list(range(1, 13))} for _ in range(4)]
    sums, counts = kl_to_oracle(Fixed(near), Fixed(base), items)
    assert all(c > 0 for c in counts)
    assert min(sums) >= 0.0, sums
