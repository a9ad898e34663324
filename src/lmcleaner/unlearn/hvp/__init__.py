"""Curvature-vector products of a step loss at recorded parameters.

A registry of backends, one file each (``hessian_mode`` names them):

- ``exact``: the Hessian of the step loss (double backward by default), ``exact.py``;
- ``GGN``: generalised Gauss-Newton ``J^T H_out J``, ``ggn.py``;
- ``diag``: a recorded per-step diagonal, ``diag.py``;
- ``low_rank``: top-r eigenpairs of the step Hessian from Lanczos, refreshed every few steps, ``low_rank.py``.

``base.py`` holds the protocol (``HVPBackend.hvp(params, batches, normaliser,
vectors, step=None)``, k directions batched) and ``register_backend``; a new
backend is one file here plus its import below.
"""

from __future__ import annotations

from typing import Any

from lmcleaner.unlearn.functional import FunctionalLM
from lmcleaner.unlearn.hvp.base import (
    BACKENDS,
    DiagProvider,
    HVPBackend,
    register_backend,
)
from lmcleaner.unlearn.hvp.diag import DiagHVP
from lmcleaner.unlearn.hvp.exact import EXACT_COST_IN_GRADS, EXACT_IMPLS, ExactHVP
from lmcleaner.unlearn.hvp.ggn import GGNHVP
from lmcleaner.unlearn.hvp.low_rank import LowRankHVP

HESSIAN_MODES = tuple(BACKENDS)
# gradient evaluations per HVP direction (k = 1), by mode and exact implementation
HVP_COST_IN_GRADS = {**{m: b.cost_in_grads for m, b in BACKENDS.items() if isinstance(b.cost_in_grads, float)},
                     "exact": EXACT_COST_IN_GRADS["double_backward"],
                     **{f"exact/{k}": v for k, v in EXACT_COST_IN_GRADS.items() if k != "double_backward"}}


def make_hvp_backend(mode: str, fl: FunctionalLM, diag_provider: DiagProvider | None = None,
                     exact_impl: str = "double_backward", **options: Any) -> HVPBackend:
    """Backend for ``hessian_mode``; one-line ValueError for bad input."""
    cls = BACKENDS.get(mode)
    if cls is None:
        raise ValueError(f"unknown hessian_mode {mode!r}; use one of {tuple(BACKENDS)}")
    return cls.build(fl, diag_provider=diag_provider, exact_impl=exact_impl, **options)


__all__ = [
    "BACKENDS",
    "EXACT_IMPLS",
    "GGNHVP",
    "HESSIAN_MODES",
    "HVP_COST_IN_GRADS",
    "DiagHVP",
    "DiagProvider",
    "ExactHVP",
    "HVPBackend",
    "LowRankHVP",
    "make_hvp_backend",
    "register_backend",
]
