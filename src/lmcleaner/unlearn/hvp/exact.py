"""Exact Hessian-vector products of the step loss (``hessian_mode=exact``).

Measured cost (``tests/unlearn/bench_hvp.py``, torch 2.13 CPU, shared 2-core
machine, 2-layer Llama hidden 64, 147,776 params, one micro-batch of 4 rows
x 32 tokens, SDPA math kernel, min over interleaved rounds, two runs, 1 and 2
threads), in gradient evaluations per direction:

    backend                            k = 1        k = 8
    exact, double backward (default)   2.0 - 2.1    0.59 - 0.80
    exact, rev-over-rev (torch.func)   2.2 - 2.3    0.66 - 0.93
    exact, fwd-over-rev                3.7 - 4.0    0.95 - 1.31
    GGN                                2.5 - 2.8    0.50 - 0.62

so double backward (``create_graph`` then one batched backward for the k
directions) is the default exact implementation; batching k directions
costs far less than k separate products. ``cost_in_grads`` holds the k = 1
figures, used to report gradient-equivalents conservatively.

Micro-batches are processed one at a time (``H = sum_b H_b / N~``, the sum
over this rank's micro-batches in ``_product_sum``, all-reduced and divided
in ``hvp.base``) so memory is that of one micro-batch, whatever the
accumulation. ``H_b`` is the Hessian of the micro-batch objective ``l_b``
(``FunctionalLM.micro_objective``): its NLL sum, plus for a mixture of experts
its router auxiliary term ``w A(B_b)`` with the step's ``w``, so the
curvature is that of the whole training loss.
"""

from __future__ import annotations

import torch
from torch.func import grad, jvp, vjp

from lmcleaner.unlearn.functional import Batch, FunctionalLM, Params
from lmcleaner.unlearn.hvp.base import HVPBackend, accumulate, log, register_backend

EXACT_IMPLS = ("double_backward", "rev_rev", "fwd_rev")
# measured, see the module docstring (gradient evaluations per HVP direction, k = 1)
EXACT_COST_IN_GRADS = {"double_backward": 2.0, "rev_rev": 2.2, "fwd_rev": 3.8}


@register_backend
class ExactHVP(HVPBackend):
    """Exact Hessian-vector products.

    ``impl="double_backward"`` (default, fastest measured): reverse over
    reverse with ``torch.autograd.grad(create_graph=True)``: one forward +
    backward builds the gradient graph, then one batched backward
    (``is_grads_batched``, i.e. vmap) through it for the k directions
    (``H`` symmetric, so ``v^T H = (H v)^T``).
    ``impl="rev_rev"``: the same with ``torch.func`` (``vjp`` of ``grad``).
    ``impl="fwd_rev"``: ``jvp`` of ``grad`` (forward-over-reverse).
    All need a twice-differentiable attention kernel, which
    ``FunctionalLM.curvature_mode`` arranges.
    """

    name = "exact"
    evaluates_where_asked = True

    def __init__(self, fl: FunctionalLM, impl: str = "double_backward") -> None:
        super().__init__()
        if impl not in EXACT_IMPLS:
            raise ValueError(f"unknown exact HVP impl {impl!r}; use one of {EXACT_IMPLS}")
        self.fl, self.impl = fl, impl

    @property
    def cost_in_grads(self) -> float:  # type: ignore[override]
        return EXACT_COST_IN_GRADS[self.impl]

    @classmethod
    def build(cls, fl, *, diag_provider=None, exact_impl: str = "double_backward", **options):
        return cls(fl, exact_impl)

    def _product_sum(self, params, batches, vectors, router_weight=0.0):
        total: Params | None = None
        for b in batches:
            def g(p: Params, b: Batch = b) -> Params:
                return grad(self.fl.micro_objective)(p, b, router_weight)

            if self.impl == "rev_rev":
                _, pullback = vjp(g, params)
                part = self._batched(lambda v: pullback(v)[0], vectors)
            elif self.impl == "double_backward":
                part = self._double_backward(params, b, vectors, router_weight)
            else:
                part = self._batched(lambda v: jvp(g, (params,), (v,))[1], vectors)
            total = accumulate(total, part)
        return total

    def _double_backward(self, params: Params, batch: Batch, vectors: Params, router_weight: float = 0.0) -> Params:
        names = list(params)
        leaves = [params[n].detach().requires_grad_() for n in names]
        with torch.enable_grad():
            loss = self.fl.micro_objective(dict(zip(names, leaves)), batch, router_weight)
            g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        pairs = [(gi, leaf, n) for gi, leaf, n in zip(g, leaves, names) if gi is not None and gi.requires_grad]
        out = {n: torch.zeros_like(vectors[n]) for n in names}
        if not pairs:
            return out
        outs, ins, vs = [p[0] for p in pairs], leaves, [vectors[p[2]] for p in pairs]
        try:
            res = torch.autograd.grad(outs, ins, grad_outputs=vs, is_grads_batched=True, allow_unused=True,
                                      retain_graph=True)
            self.last_path = "vmap"
        except Exception as exc:  # noqa: BLE001
            if not self._warned:
                log.warning("batched double backward failed (%s); falling back to a loop", type(exc).__name__)
                self._warned = True
            k = vs[0].shape[0]
            per = [torch.autograd.grad(outs, ins, grad_outputs=[v[i] for v in vs], allow_unused=True,
                                       retain_graph=True) for i in range(k)]
            res = [None if per[0][j] is None else torch.stack([r[j] for r in per]) for j in range(len(ins))]
            self.last_path = "loop"
        for n, r in zip(names, res):
            if r is not None:
                out[n] = r.detach()
        return out
