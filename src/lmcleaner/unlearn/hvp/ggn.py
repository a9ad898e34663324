"""Generalised Gauss-Newton products (``hessian_mode=GGN``): ``J^T H_out J v / N``."""

from __future__ import annotations

import torch
from torch.func import jvp, vjp

from lmcleaner.train.loss import IGNORE_INDEX, shift_labels
from lmcleaner.unlearn.functional import Batch, FunctionalLM, Params
from lmcleaner.unlearn.hvp.base import HVPBackend, accumulate, register_backend


@register_backend
class GGNHVP(HVPBackend):
    """Generalised Gauss-Newton products ``J^T H_out J v / N``.

    ``J`` is the Jacobian of the float32 logits w.r.t. the trainable
    parameters and ``H_out = diag(p) - p p^T`` the Hessian of softmax
    cross-entropy w.r.t. the logits at each *supervised* (shifted) position;
    unsupervised positions contribute nothing. Computed as jvp of the logits,
    multiplication by ``H_out``, vjp back: never forms ``J``. Positive
    semi-definite, unlike the exact Hessian.
    """

    name = "GGN"
    cost_in_grads = 2.7  # measured, see exact.py

    def __init__(self, fl: FunctionalLM) -> None:
        super().__init__()
        self.fl = fl

    @classmethod
    def build(cls, fl, *, diag_provider=None, **options):
        return cls(fl)

    def _product_sum(self, params, batches, vectors):
        total: Params | None = None
        for b in batches:
            def f(p: Params, b: Batch = b) -> torch.Tensor:
                return self.fl.logits(p, b)

            z, pullback = vjp(f, params)
            prob = z.detach().softmax(-1)
            mask = (shift_labels(b["labels"]) != IGNORE_INDEX).unsqueeze(-1).to(prob.dtype)

            def one(v: Params) -> Params:
                jv = jvp(f, (params,), (v,))[1]
                u = prob * jv - prob * (prob * jv).sum(-1, keepdim=True)
                return pullback(u * mask)[0]

            total = accumulate(total, self._batched(one, vectors))
        return total
