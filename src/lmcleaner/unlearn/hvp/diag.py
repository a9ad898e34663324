"""Elementwise products with a recorded diagonal (``hessian_mode=diag``)."""

from __future__ import annotations

from collections.abc import Mapping

from lmcleaner.unlearn.functional import Params
from lmcleaner.unlearn.hvp.base import DiagProvider, HVPBackend, register_backend


@register_backend
class DiagHVP(HVPBackend):
    """Elementwise product with a supplied per-step diagonal of the step-loss Hessian.

    ``provider`` maps a step index to ``{name: diagonal}`` (a mapping or a
    callable), e.g. the recorder's diag mode; the diagonal is that of ``H_t``
    of the normalised step loss, so ``normaliser`` is not applied again.
    """

    name = "diag"
    cost_in_grads = 0.0  # no model evaluation; the estimate is paid at record time

    def __init__(self, provider: DiagProvider) -> None:
        super().__init__()
        self.provider = provider

    @classmethod
    def build(cls, fl, *, diag_provider=None, **options):
        if diag_provider is None:
            raise ValueError("hessian_mode='diag' needs diag_provider (per-step diagonals); "
                             "record with compute_diag_h=true or use hessian_mode='exact' or 'GGN'")
        return cls(diag_provider)

    def diagonal(self, step: int | None) -> Params:
        if step is None:
            raise ValueError("diag HVP needs the step index; call hvp(..., step=t)")
        try:
            d = self.provider[step] if isinstance(self.provider, Mapping) else self.provider(step)
        except KeyError:
            d = None
        if d is None:
            raise ValueError(f"no diagonal curvature for step {step}; record with compute_diag_h=true")
        return d

    def _hvp(self, params, batches, normaliser, vectors, step):
        diag = self.diagonal(step)
        missing = [n for n in vectors if n not in diag]
        if missing:
            raise ValueError(f"diagonal for step {step} lacks parameters {missing[:3]}")
        self.last_path = "vmap"
        return {n: v * diag[n].to(v.dtype) for n, v in vectors.items()}
