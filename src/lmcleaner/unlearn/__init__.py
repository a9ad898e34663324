"""Unlearning engine: optimizer-aware propagation of injected gradient
differences along the recorded trajectory (DESIGN §3).

Public API::

    from lmcleaner.unlearn import LMCleanerSampleLevel, apply_correction
    corr = LMCleanerSampleLevel(K=800, hessian_mode="exact").compute(model, steps, spec, [17, 203], tau)
    new_params, new_opt_state = apply_correction(model, opt_state, corr)
"""

from lmcleaner.unlearn.functional import FunctionalLM, removal_injection, split_rows
from lmcleaner.unlearn.hvp import (
    HESSIAN_MODES,
    HVP_COST_IN_GRADS,
    DiagHVP,
    ExactHVP,
    GGNHVP,
    HVPBackend,
    make_hvp_backend,
)
from lmcleaner.unlearn.methods import (
    Correction,
    CorrectionAudit,
    LMCleanerBatchLevel,
    LMCleanerSampleLevel,
    Rollback,
    SGDFormula,
    apply_correction,
    batch_injector,
    sample_injector,
)
from lmcleaner.unlearn.propagation import PropagationResult, SweepStats, propagate
from lmcleaner.unlearn.registry import get_method, method_config, method_names, register_method
from lmcleaner.unlearn.result import UnlearnError, UnlearnResult


def __getattr__(name: str):
    # The session side imports the trainer and the trajectory package; keep it lazy.
    if name in ("UnlearnSession", "USER_ERRORS"):
        from lmcleaner.unlearn import session

        return getattr(session, name)
    if name == "OnlineUnlearner":
        from lmcleaner.unlearn.online import OnlineUnlearner

        return OnlineUnlearner
    raise AttributeError(name)

__all__ = [
    "OnlineUnlearner",
    "UnlearnSession",
    "UnlearnError",
    "UnlearnResult",
    "Correction",
    "CorrectionAudit",
    "DiagHVP",
    "ExactHVP",
    "FunctionalLM",
    "GGNHVP",
    "HESSIAN_MODES",
    "HVPBackend",
    "HVP_COST_IN_GRADS",
    "LMCleanerBatchLevel",
    "LMCleanerSampleLevel",
    "PropagationResult",
    "Rollback",
    "SGDFormula",
    "SweepStats",
    "apply_correction",
    "get_method",
    "method_config",
    "method_names",
    "register_method",
    "batch_injector",
    "make_hvp_backend",
    "propagate",
    "removal_injection",
    "sample_injector",
    "split_rows",
]
