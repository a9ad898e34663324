"""Certified removal: Gaussian noise calibrated to a bound on the residual to exact retraining.

- ``mechanism.py``: the Gaussian mechanism (analytic calibration of Balle & Wang
  2018, the classic one for comparison), isotropic and subspace noise;
- ``bound.py``: data-independent residual bounds from clipping and the recorded
  learning rates (formal), or a measured residual (empirical);
- ``step.py``: ``certify_result``, the post-processing step any method's
  ``UnlearnResult`` goes through (``trainer.method_args.certify.*``).

The derivation and what it does and does not prove: ``docs/certification.md``.
"""

from .bound import (
    NoFormalBound,
    ResidualBound,
    adam_state_bound,
    adam_update_bound,
    empirical_bound,
    formal_residual_bound,
)
from .mechanism import (
    GaussianNoise,
    analytic_sigma,
    classic_sigma,
    gaussian_delta,
    gaussian_sigma,
    subspace_sigmas,
)
from .step import (
    CertifyConfig,
    certify_config,
    certify_result,
    curvature_basis,
    formal_bound_for,
    hessian_basis,
    measured_residual,
)

__all__ = [
    "CertifyConfig", "GaussianNoise", "NoFormalBound", "ResidualBound", "adam_state_bound", "adam_update_bound", "analytic_sigma",
    "certify_config", "certify_result", "classic_sigma", "curvature_basis", "empirical_bound", "formal_bound_for",
    "formal_residual_bound", "gaussian_delta", "gaussian_sigma", "hessian_basis", "measured_residual", "subspace_sigmas",
]
