"""Low-rank curvature products (``hessian_mode=low_rank``): ``H v ~ U diag(lambda) U^T v``.

``U`` (``n x r``, orthonormal) and ``lambda`` are the ``r`` largest-magnitude
eigenpairs of the exact step-loss Hessian ``H_s`` at the recorded ``theta_s``
(``unlearn/lanczos.py``: block Lanczos with full reorthogonalisation over
exact HVPs, ``hvp/exact.py``). They are computed at a step and reused for the
next ``refresh - 1`` steps (``refresh = 1``: every step, the rank-r truncation
of each ``H_s``; larger: the curvature of an earlier step of the window stands
in for the current one, the staleness approximation that makes the backend
cheap). A product is then two thin matrix products, no model evaluation.

Accuracy (tested against ``torch.autograd.functional.hessian``): with
``r = n`` the product is exact; the error ``||H - U diag(lambda) U^T||_2 =
|lambda_{r+1}|`` decreases with ``r``.

Cost: a refresh multiplies ``iters * block`` directions with the exact backend
(``2r + 10`` by default); those directions, at the exact backend's measured
cost per direction, are spread over the products made with the basis, so
``cost_in_grads`` is the real amortised cost of one product (read it after the
sweep). ``lanczos_hvps`` / ``refreshes`` hold the counts.
"""

from __future__ import annotations

from typing import Any

import torch

from lmcleaner.unlearn.functional import FunctionalLM, Params
from lmcleaner.unlearn.hvp.base import HVPBackend, register_backend
from lmcleaner.unlearn.hvp.exact import ExactHVP
from lmcleaner.unlearn.lanczos import flatten_batch, lanczos, unflatten_batch


@register_backend
class LowRankHVP(HVPBackend):
    """``H v ~ U diag(lambda) U^T v`` from Lanczos at a step, refreshed every ``refresh`` steps.

    ``rank``: eigenpairs kept; ``refresh``: steps between Lanczos runs (a call
    without a step index always refreshes); ``iters``: Lanczos block
    iterations (default ``ceil((2 rank + 10) / block)``); ``block``: directions
    per batched exact HVP in Lanczos; ``seed``: start block (+ the step index).
    """

    name = "low_rank"

    def __init__(self, fl: FunctionalLM, rank: int = 16, refresh: int = 10, iters: int | None = None,
                 block: int = 4, seed: int = 0, exact_impl: str = "double_backward") -> None:
        super().__init__()
        if int(rank) < 1:
            raise ValueError(f"low_rank rank={rank} must be >= 1")
        if int(refresh) < 1:
            raise ValueError(f"low_rank refresh={refresh} must be >= 1 (steps between Lanczos runs)")
        self.fl, self.rank, self.refresh, self.iters = fl, int(rank), int(refresh), iters
        self.block, self.seed = int(block), int(seed)
        self.exact = ExactHVP(fl, exact_impl)
        self.basis: Params | None = None  # {name: [r, *shape]}
        self.eigvals: torch.Tensor | None = None
        self.basis_step: int | None = None
        self.refreshes = 0
        self.krylov_dim = 0

    @classmethod
    def build(cls, fl, *, diag_provider=None, exact_impl: str = "double_backward", **options: Any):
        return cls(fl, exact_impl=exact_impl, **options)

    @property
    def lanczos_hvps(self) -> int:
        """Exact HVP directions spent in Lanczos so far."""
        return self.exact.vectors

    @property
    def cost_in_grads(self) -> float:  # type: ignore[override]
        """Lanczos directions at the exact cost, per product made (amortised; 0 before any)."""
        return self.exact.vectors * self.exact.cost_in_grads / max(self.vectors, 1)

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "refresh": self.refresh, "iters": self.iters, "block": self.block,
                "refreshes": self.refreshes, "lanczos_hvps": self.lanczos_hvps, "krylov_dim": self.krylov_dim,
                "products": self.vectors, "cost_in_grads_amortised": self.cost_in_grads}

    def _stale(self, step: int | None) -> bool:
        return self.basis is None or step is None or self.basis_step is None or step - self.basis_step >= self.refresh

    def _refresh(self, params: Params, batches, normaliser: float, step: int | None) -> None:
        n = sum(t.numel() for t in params.values())
        r = min(self.rank, n)

        def matvec(V: Params) -> Params:
            return self.exact.hvp(params, batches, normaliser, V, step=step)

        res = lanczos(matvec, params, r, iters=self.iters, seed=self.seed + (step or 0), block=min(self.block, n))
        self.basis, self.eigvals, self.basis_step = res.eigvecs, res.eigvals, step
        self.refreshes += 1
        self.krylov_dim = res.dim

    def _hvp(self, params, batches, normaliser, vectors, step):
        if self._stale(step):
            self._refresh(params, batches, normaliser, step)
        names = list(self.basis)
        U = flatten_batch(self.basis, names)  # [n, r]
        V = flatten_batch(vectors, names)  # [n, k]
        out = U @ (self.eigvals.to(U.dtype)[:, None] * (U.T @ V))
        self.last_path = "low_rank"
        return unflatten_batch(out, {n: vectors[n][0] for n in names})
