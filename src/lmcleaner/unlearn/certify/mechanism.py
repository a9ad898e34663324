"""The Gaussian mechanism: noise scale for (epsilon, delta), isotropic and subspace noise.

Setting. Two parameter vectors ``a`` (the certified result) and ``b`` (exact
retraining) with ``||a - b|| <= B`` (the *sensitivity*, a bound on the
residual). Releasing ``a + N`` with ``N ~ N(0, Sigma)`` is
(epsilon, delta)-indistinguishable from ``b + N`` when for every set ``S``
``P[a + N in S] <= e^eps P[b + N in S] + delta`` and symmetrically.

Calibration (``calibration=``):

- ``analytic`` (default; Balle & Wang 2018, "Improving the Gaussian mechanism
  for differential privacy", Theorem 8): with ``Sigma = sigma^2 I`` the
  release is (epsilon, delta)-indistinguishable for every ``||a - b|| <= B``
  if and only if
  ``delta(sigma) = Phi(B/(2 sigma) - eps sigma/B) - e^eps Phi(-B/(2 sigma) - eps sigma/B) <= delta``.
  ``delta(sigma)`` decreases in ``sigma``; the smallest admissible ``sigma``
  is its root, found with ``scipy.optimize.brentq`` (``e^eps Phi(x)`` is
  evaluated as ``exp(eps + log_ndtr(x))`` so large ``eps`` does not
  overflow). Exact for every ``eps > 0``; ``sigma`` is proportional to ``B``.
- ``classic`` (Dwork & Roth 2014, Theorem A.1): ``sigma = B sqrt(2 ln(1.25/delta)) / eps``,
  sufficient only for ``eps < 1`` (refused otherwise) and never smaller than
  the analytic one.

Subspace noise. With ``P`` the orthogonal projector on an ``r``-dimensional
subspace (top-r curvature eigenvectors ``U``, ``P = U U^T``) and
``Sigma = s_par^2 P + s_perp^2 (I - P)``, the release is a Gaussian mechanism
after whitening by ``Sigma^{-1/2}``: its privacy loss is that of the isotropic
unit-variance mechanism with sensitivity
``||Sigma^{-1/2} (a - b)|| = sqrt(||P r||^2 / s_par^2 + ||(I-P) r||^2 / s_perp^2)``
(``r = a - b``). With ``s1 = sigma_analytic(eps, delta, sensitivity 1)`` the
statement holds whenever that quantity is ``<= 1/s1``. Given separate bounds
``||P r|| <= B_par`` and ``||(I-P) r|| <= B_perp``, every split

    s_par = s1 B_par / sqrt(alpha),   s_perp = s1 B_perp / sqrt(1 - alpha),   0 < alpha < 1

satisfies it (``B_par^2/s_par^2 + B_perp^2/s_perp^2 = 1/s1^2``); the one used
minimises the expected squared noise ``r s_par^2 + (n - r) s_perp^2``:
``alpha = sqrt(r) B_par / (sqrt(r) B_par + sqrt(n - r) B_perp)`` (Lagrange).
When only the total ``||r|| <= B`` is known, the worst ``r`` puts all of it in
the noisier-per-unit part, so both sigmas must be ``s1 B``: subspace noise
then reduces to isotropic noise, and that is what is used.

Sampling. ``N = s_par U z1 + s_perp (z2 - U U^T z2)`` with ``z1 ~ N(0, I_r)``,
``z2 ~ N(0, I_n)`` from a ``torch.Generator`` seeded with the recorded seed
(parameters in sorted-name order), so a result is reproducible from its
audit record. The same seed lets anyone holding the record subtract the
noise: the record is as confidential as the un-noised weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr

from lmcleaner.unlearn.functional import Params

CALIBRATIONS = ("analytic", "classic")


def _check(epsilon: float, delta: float, sensitivity: float) -> None:
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon={epsilon} must be a positive finite number")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    if not (sensitivity >= 0 and math.isfinite(sensitivity)):
        raise ValueError(f"sensitivity (residual bound) {sensitivity} must be a finite number >= 0")


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """The exact delta of the Gaussian mechanism at ``epsilon`` (Balle & Wang 2018, Thm 8):
    ``Phi(B/(2s) - eps s/B) - e^eps Phi(-B/(2s) - eps s/B)``."""
    if sensitivity == 0:
        return 0.0
    if sigma <= 0:
        return 1.0
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return float(ndtr(a - b) - np.exp(epsilon + log_ndtr(-a - b)))


def analytic_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest ``sigma`` with ``gaussian_delta(sigma) <= delta`` (root by ``brentq``)."""
    _check(epsilon, delta, sensitivity)
    if sensitivity == 0:
        return 0.0

    def f(log_s: float) -> float:  # unit sensitivity, sigma = exp(log_s)
        return gaussian_delta(math.exp(log_s), epsilon, 1.0) - delta

    lo, hi = -10.0, 10.0
    while f(lo) < 0:
        lo -= 10.0
    while f(hi) > 0:
        hi += 10.0
    root = brentq(f, lo, hi, xtol=1e-14, rtol=1e-12)
    s = math.exp(root)
    # brentq returns a point within tolerance of the root; step to the admissible side
    while gaussian_delta(s, epsilon, 1.0) > delta:
        s *= 1 + 1e-12
    return s * sensitivity


def classic_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """``B sqrt(2 ln(1.25/delta)) / eps``; valid (sufficient) only for ``eps < 1``."""
    _check(epsilon, delta, sensitivity)
    if epsilon >= 1:
        raise ValueError(f"the classic Gaussian mechanism needs epsilon < 1 (got {epsilon}); "
                         "use calibration=analytic")
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float, calibration: str = "analytic") -> float:
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration={calibration!r}: use one of {CALIBRATIONS}")
    return (analytic_sigma if calibration == "analytic" else classic_sigma)(epsilon, delta, sensitivity)


def subspace_sigmas(epsilon: float, delta: float, b_par: float, b_perp: float, r: int, n: int,
                    calibration: str = "analytic") -> tuple[float, float, float]:
    """``(sigma_par, sigma_perp, alpha)`` for separate bounds on the residual's parts in an
    ``r``-dimensional subspace of ``R^n`` and its complement (module docstring)."""
    s1 = gaussian_sigma(epsilon, delta, 1.0, calibration)
    if b_par < 0 or b_perp < 0:
        raise ValueError("residual bounds must be >= 0")
    if b_perp == 0:
        return s1 * b_par, 0.0, 1.0
    if b_par == 0:
        return 0.0, s1 * b_perp, 0.0
    wa, wb = math.sqrt(r) * b_par, math.sqrt(max(n - r, 0)) * b_perp
    alpha = wa / (wa + wb)
    return s1 * b_par / math.sqrt(alpha), s1 * b_perp / math.sqrt(1 - alpha), alpha


def _flat_names(template: Params) -> list[str]:
    return sorted(template)


def flatten(params: Params, names: list[str] | None = None) -> torch.Tensor:
    names = names or _flat_names(params)
    return torch.cat([params[n].detach().reshape(-1).float() for n in names])


def unflatten(flat: torch.Tensor, template: Params) -> Params:
    out, i = {}, 0
    for n in _flat_names(template):
        t = template[n]
        out[n] = flat[i:i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


@dataclass
class GaussianNoise:
    """A Gaussian noise distribution on the trainable parameters (module docstring).

    ``basis``: ``[n, r]`` orthonormal columns (flat, sorted-name order) or
    ``None`` for isotropic noise (``sigma`` on every coordinate)."""

    sigma: float
    sigma_perp: float | None = None  # subspace mode: noise on the complement of the basis
    basis: torch.Tensor | None = None
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return 0 if self.basis is None else int(self.basis.shape[1])

    def draw_flat(self, n: int, k: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` draws as ``[k, n]`` float32 (one generator stream, seeded with ``seed`` if not given)."""
        g = generator or torch.Generator().manual_seed(int(self.seed))
        if self.basis is None:
            return self.sigma * torch.randn(k, n, generator=g)
        U = self.basis.float()
        z1 = torch.randn(k, U.shape[1], generator=g)
        z2 = torch.randn(k, n, generator=g)
        perp = z2 - (z2 @ U) @ U.T
        return self.sigma * (z1 @ U.T) + float(self.sigma_perp or 0.0) * perp

    def sample(self, template: Params) -> Params:
        """One draw shaped like ``template`` (its dtype and device), reproducible from ``seed``."""
        n = sum(t.numel() for t in template.values())
        flat = self.draw_flat(n)[0]
        return {k: v.to(template[k].device) for k, v in unflatten(flat, template).items()}

    def add_to(self, params: Params) -> Params:
        """NEW tensors ``params + noise`` (summed in float32, returned in each tensor's dtype)."""
        noise = self.sample(params)
        return {n: (p.detach().float() + noise[n]).to(p.dtype) for n, p in params.items()}
