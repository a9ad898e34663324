"""Generalised Gauss-Newton products (``hessian_mode=GGN``): ``J^T H_out J v / N``.

For a mixture of experts trained with router losses the network has a second
output, the router logits ``r`` of every MoE layer, and the micro-batch
objective ``l_b = S_b + w A(r)`` (``w = N~/M+`` of the whole step,
``unlearn.functional``) has a loss on each; the GGN is then
``J_z^T H_z J_z + w J_r^T (d^2 A / dr^2) J_r`` per micro-batch, summed over
this rank's micro-batches (``_product_sum``), all-reduced and divided by
``N~`` (``hvp.base``). ``d^2 A/dr^2`` is the exact
Hessian of the auxiliary loss in the router logits (the top-k assignment
fractions are constants); the load-balance part of it is not positive
semi-definite, so with router losses the GGN is no longer guaranteed PSD.
"""

from __future__ import annotations

from torch.func import grad, jvp, vjp

from lmcleaner.train.loss import IGNORE_INDEX, shift_labels
from lmcleaner.train.router import has_samples
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
    semi-definite, unlike the exact Hessian (router term: module docstring).
    """

    name = "GGN"
    evaluates_where_asked = True
    cost_in_grads = 2.7  # measured, see exact.py

    def __init__(self, fl: FunctionalLM) -> None:
        super().__init__()
        self.fl = fl

    @classmethod
    def build(cls, fl, *, diag_provider=None, **options):
        return cls(fl)

    def _product_sum(self, params, batches, vectors, router_weight=0.0):
        total: Params | None = None
        router = self.fl.router
        for b in batches:
            with_router = router is not None and router_weight != 0.0 and has_samples(b)

            def f(p: Params, b: Batch = b, with_router: bool = with_router):
                logits, router_logits = self.fl.forward(p, b)
                return (logits, router_logits) if with_router else logits

            out, pullback = vjp(f, params)
            z = out[0] if with_router else out
            prob = z.detach().softmax(-1)
            mask = (shift_labels(b["labels"].to(prob.device)) != IGNORE_INDEX).unsqueeze(-1).to(prob.dtype)
            r0 = tuple(t.detach() for t in out[1]) if with_router else None

            def aux_of(r, b: Batch = b):
                return router.loss(r, b)

            def one(v: Params, f=f, prob=prob, mask=mask, pullback=pullback, r0=r0, aux_of=aux_of,
                    with_router=with_router) -> Params:
                jv = jvp(f, (params,), (v,))[1]
                jz = jv[0] if with_router else jv
                u = (prob * jz - prob * (prob * jz).sum(-1, keepdim=True)) * mask
                if not with_router:
                    return pullback(u)[0]
                hr = jvp(grad(aux_of), (r0,), (tuple(jv[1]),))[1]
                return pullback((u, tuple(router_weight * t for t in hr)))[0]

            total = accumulate(total, self._batched(one, vectors))
        return total
