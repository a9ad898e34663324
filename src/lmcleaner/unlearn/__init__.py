"""Unlearning engine: optimizer-aware propagation of injected gradient
differences along the recorded trajectory (DESIGN §3).

Public API::

    from lmcleaner.unlearn import LMCleanerSampleLevel, apply_correction
    corr = LMCleanerSampleLevel(K=800, hessian_mode="exact").compute(model, steps, spec, [17, 203], tau)
    new_params, new_opt_state = apply_correction(model, opt_state, corr)
"""

# Exports resolve lazily (PEP 562): the session side imports the trainer and the trajectory
# package, and ``lmcleaner unlearn --help`` must not import torch.
from ..lazy import lazy_exports

_EXPORTS = {
    "FunctionalLM": "functional", "removal_injection": "functional", "split_rows": "functional",
    "HESSIAN_MODES": "hvp", "HVP_COST_IN_GRADS": "hvp", "DiagHVP": "hvp", "ExactHVP": "hvp", "GGNHVP": "hvp",
    "HVPBackend": "hvp", "make_hvp_backend": "hvp",
    "Correction": "methods", "CorrectionAudit": "methods", "LMCleanerBatchLevel": "methods",
    "LMCleanerSampleLevel": "methods", "Rollback": "methods", "SGDFormula": "methods",
    "apply_correction": "methods", "batch_injector": "methods", "sample_injector": "methods",
    "PropagationResult": "propagation", "SweepStats": "propagation", "propagate": "propagation",
    "UnlearnSession": "session", "USER_ERRORS": "session", "UnlearnError": "result", "UnlearnResult": "result",
    "get_method": "registry", "method_config": "registry", "method_names": "registry",
    "register_method": "registry",
    "OnlineUnlearner": "online",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
