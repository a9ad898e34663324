"""Bounds on the residual ``||theta_hat - theta'||`` between a corrected model and exact retraining.

``theta'`` is the exact counterfactual (the same run without the forget set
``Z``, DESIGN §3), ``theta_hat = theta + d`` the correction's output. The
full derivation, and what is and is not proven, is in ``docs/certification.md``;
in short, per step ``s`` with applied learning rate ``eta_s`` (the largest of
the param groups), global-norm clipping at ``c`` and ``n`` trainable
parameters:

Per-step sensitivity (proven). ``clip_grad_norm_`` leaves every step gradient
with norm ``<= c``, whatever the data; so at a step that used ``Z`` the
gradient the optimizer sees changes by at most ``2c`` (``c`` at batch level,
where the counterfactual gradient is zero). AdamW normalises per coordinate:
by Cauchy-Schwarz ``|m_hat_t / (sqrt(v_hat_t) + eps)| <= C_t`` per coordinate
for any gradient sequence, ``C_t = (1-b1)/(1-b1^t) sqrt((1-b2^t)/(1-b2)) sqrt(sum_{j<t} (b1^2/b2)^j)``,
so an update changes by at most ``2 C_t sqrt(n)`` (no clipping needed, but
``sqrt(n)``: useless for noise on real models, and reported as such).

Worst case (``assume="none"``, proven for any loss): the correction's first
step reproduces the counterfactual step exactly (same ``theta_t``, exact
injection, the optimizer's exact map), so ``r = theta_hat - theta'`` is 0
after the first use ``t_1``; afterwards each step changes ``r`` by the
difference of two clipped gradients (the counterfactual's and the
correction's linearised one), ``<= 2c`` before the optimizer:

    SGD:       R_{s+1} <= |1 - eta wd| R_s + eta 2c m_s + eta lambda D_s
    momentum:  Q_s <= mu Q_{s-1} + 2c m_s + wd R_s,  R_{s+1} <= R_s + eta Q_s (+ nesterov term) + eta lambda D_s
    AdamW:     R_{s+1} <= |1 - eta wd| R_s + eta 2 C_{s+1} sqrt(n) m_s + eta lambda D_s

(``m_s >= 1``: correction columns propagating at ``s``; truncated windows that
overlap each add a clipped secant; 1 with the full window)

(``lambda`` the correction's damping, ``D_s`` the same recursion's bound on
``||d_s||``). ``B = R_tau``: grows with every step after the first use. For
AdamW the first step is counted too: in float32 the exact first step is exact
only up to rounding, and Adam amplifies rounding on coordinates whose second
moment is still 0 (an embedding row only ``Z`` touched: ``g + e`` is ``1e-10``
instead of 0, and ``m / (sqrt(v) + eps)`` turns it into ``~1e-2``; measured in
``tests/unlearn/test_certify.py``).

Lipschitz steps (``assume="lipschitz"``, plain SGD only, an ASSUMPTION): every
training step map ``x -> x - eta_s (clip(grad L_s(x)) + wd x)`` (with and
without ``Z``) and the correction's linearised map are ``rho``-Lipschitz
(``rho = 1``: non-expansive, e.g. a convex L-smooth loss with ``eta <= 2/L``;
``rho < 1``: contractive, e.g. strongly convex). Then the deviation of
retraining obeys ``X_{s+1} <= rho X_s + [s uses Z] eta_s 2c``; each correction
column (injections sharing a window end ``min(t + K, tau - 1)``) obeys the same
inside its window and is carried unchanged after it; ``B = X_tau + sum_c Y_c``
(triangle inequality), and the smaller of this and the worst case is used.
With ``rho < 1`` the carried part decays like ``rho^K``: the paper's
"truncation residual decays exponentially with the window".

Neither bound reads the content of ``Z``: they use the recorded learning
rates, ``c``, the optimizer's hyper-parameters, ``n``, ``K`` and *which*
steps used ``Z`` (public in the audit record). The measured residual
(``empirical``) is computed from the data and is never called formal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmcleaner.trajectory.types import OptimizerSpec, StepRecord

from ..result import UnlearnError

ASSUMPTIONS = ("none", "lipschitz")


class NoFormalBound(UnlearnError):
    """No data-independent residual bound exists for this run / method; the message says why."""


@dataclass
class ResidualBound:
    """A bound ``B >= ||theta_hat - theta'||`` and where it comes from (audit fields)."""

    value: float
    guarantee: str  # "formal" | "empirical"
    source: str  # one line
    assumptions: list[str] = field(default_factory=list)
    parallel: float | None = None  # empirical subspace split: ||P r||
    perpendicular: float | None = None  # ||(I - P) r||
    details: dict[str, Any] = field(default_factory=dict)


def adam_update_bound(beta1: float, beta2: float, t: int) -> float:
    """``C_t``: a bound on ``|m_hat_t / sqrt(v_hat_t)|`` per coordinate for ANY gradients (module doc)."""
    gamma = beta1 ** 2 / beta2
    s = float(t) if abs(gamma - 1) < 1e-15 else (1 - gamma ** t) / (1 - gamma)
    return (1 - beta1) / (1 - beta1 ** t) * math.sqrt((1 - beta2 ** t) / (1 - beta2)) * math.sqrt(s)


def _group_factors(spec: OptimizerSpec, rec: StepRecord) -> tuple[float, float, float]:
    """(largest lr, largest |1 - lr wd|, largest wd) over param groups at one step."""
    if len(rec.lrs) != len(spec.groups):
        raise NoFormalBound(f"step {rec.step}: {len(rec.lrs)} recorded learning rates for {len(spec.groups)} "
                            "param groups")
    eta = max(float(x) for x in rec.lrs)
    contraction = max(abs(1 - float(lr) * g.weight_decay) for lr, g in zip(rec.lrs, spec.groups))
    return eta, contraction, max(g.weight_decay for g in spec.groups)


def adam_state_bound(beta1: float, beta2: float, t: int) -> float:
    """``C_t`` with the geometric sum at its limit ``1/(1 - b1^2/b2)``: also bounds
    ``|m_hat/sqrt(v_hat)|`` for any state that satisfies ``m^2 <= v (1-b1)^2/((1-b2)(1-b1^2/b2))``
    (the clamp ``methods._consistent_second_moment`` applies to corrected states), ``>= C_t``."""
    gamma = beta1 ** 2 / beta2
    if gamma >= 1:
        return adam_update_bound(beta1, beta2, t)
    return (1 - beta1) / (1 - beta1 ** t) * math.sqrt((1 - beta2 ** t) / (1 - beta2)) / math.sqrt(1 - gamma)


def formal_residual_bound(
    spec: OptimizerSpec,
    records: Sequence[StepRecord],
    steps_touched: Sequence[int],
    tau: int,
    n_params: int,
    *,
    level: str = "sample",
    K: int | None = None,
    damping: float = 0.0,
    assume: str = "none",
    rho: float = 1.0,
    exact_until: int | None = None,
) -> ResidualBound:
    """Data-independent bound on ``||theta_hat - theta'||`` for a correction method.

    ``records``: the recorded steps ``t_1 .. tau - 1`` (``t_1`` = first step
    in ``steps_touched``), consecutive; ``level``: ``sample`` or ``batch``;
    ``K``: the correction's window (``None``: full); ``damping``: its lambda;
    ``exact_until``: the result coincides with the counterfactual before this
    step (the exact first window of ``propagation=replay``; default: after the
    first use for SGD, the first use for AdamW, see the module docstring).
    Raises :class:`NoFormalBound` (one line) where no bound exists."""
    if assume not in ASSUMPTIONS:
        raise UnlearnError(f"certify.assume={assume!r}: use one of {ASSUMPTIONS}")
    opt = spec.name.lower()
    c = spec.max_grad_norm if spec.max_grad_norm and spec.max_grad_norm > 0 else None
    touched = sorted({int(s) for s in steps_touched})
    if not touched:
        raise NoFormalBound("no step used the forget set: nothing to bound")
    t1 = touched[0]
    recs = [r for r in records if t1 <= r.step < tau]
    if [r.step for r in recs] != list(range(t1, tau)):
        raise NoFormalBound(f"the bound needs the records of steps {t1}..{tau - 1}")
    if opt == "sgd" and c is None:
        raise NoFormalBound("no formal bound: the run was not clipped (training.max_grad_norm <= 0), so a removed "
                            "sample can change a step's update by an unbounded amount")
    if opt not in ("sgd", "adamw"):
        raise NoFormalBound(f"no formal bound for optimizer {spec.name!r}")
    if assume == "lipschitz" and not (opt == "sgd" and spec.momentum == 0):
        raise NoFormalBound("certify.assume=lipschitz is derived for plain SGD (momentum 0); this run used "
                            f"{spec.name}{' with momentum' if opt == 'sgd' else ''}: use certify.assume=none")
    if rho < 0:
        raise UnlearnError(f"certify.rho={rho} must be >= 0")
    mu = spec.momentum if opt == "sgd" else 0.0
    b1, b2 = spec.betas
    root_n = math.sqrt(n_params)
    g_inj = (c if level == "batch" else 2 * c) if c is not None else None
    if exact_until is None:
        exact_until = t1 + 1 if opt == "sgd" else t1

    def step_change(s: int) -> float:
        """Bound on the change of the optimizer's step direction between two runs (before eta)."""
        return 2 * c if opt == "sgd" else 2 * adam_state_bound(b1, b2, s + 1) * root_n

    # correction columns (propagation.py): injections sharing a window end min(t + K, tau - 1) share one
    # deviation vector, propagated from its first injection to its end; each active column adds its own
    # clipped secant, so a step with m active columns can differ by m x the per-step change
    window = tau if K is None else int(K)
    columns: dict[int, list[int]] = {}
    for t in touched:
        columns.setdefault(min(t + window, tau - 1), []).append(t)

    def active(s: int) -> int:
        return max(1, sum(1 for end, ts in columns.items() if ts[0] <= s <= end))

    # worst case. I: the influence ||theta' - theta|| (retraining vs the recorded run); R: the residual
    # ||theta_hat - theta'||, 0 before exact_until; ||d|| <= R + I bounds the damping term; QI, Q: the
    # momentum-buffer counterparts
    R = I = Q = QI = 0.0
    for rec in recs:
        s = rec.step
        eta, a, wd = _group_factors(spec, rec)
        u = step_change(s)
        first = g_inj if (s == t1 and opt == "sgd") else u
        if mu != 0:
            QI = mu * QI + first + wd * I
            I_next = I + eta * ((first + wd * I + mu * QI) if spec.nesterov else QI)
        else:
            I_next = a * I + eta * first
        if s >= exact_until:
            um = u * active(s)
            if mu != 0:
                Q = mu * Q + um + wd * R
                R = R + eta * ((um + wd * R + mu * Q) if spec.nesterov else Q) + eta * damping * (R + I)
            else:
                R = a * R + eta * um + eta * damping * (R + I)
        I = I_next
    worst = R
    details: dict[str, Any] = {"first_use": t1, "exact_until": exact_until, "steps": tau - t1,
                               "uses": len(touched), "clip_norm": c, "optimizer": opt, "n_params": n_params,
                               "worst_case": worst, "influence_bound": I,
                               "max_lr": max(max(r.lrs) for r in recs)}
    if opt == "adamw":
        details["adam_update_bound_C"] = adam_state_bound(b1, b2, tau)
    where = f"{spec.name}, {'clip ' + format(c, 'g') if c else 'no clipping'}, steps {exact_until}..{tau - 1}"
    if assume == "none":
        per = "2c" if opt == "sgd" else "2 C_t sqrt(n)"
        return ResidualBound(worst, "formal", f"worst case over every step after the result last equals "
                             f"retraining ({where}; per-step change <= eta x {per}); no assumption on the loss",
                             [], details=details)

    # Lipschitz steps (plain SGD): deviation of retraining X, correction columns Y by window end
    X = 0.0
    cols = {end: 0.0 for end in columns}
    for rec in recs:
        s = rec.step
        eta = max(float(x) for x in rec.lrs)
        X = rho * X + (eta * g_inj if s in touched else 0.0)
        for end, ts in columns.items():
            if ts[0] <= s <= end:
                cols[end] = rho * cols[end] + (eta * (g_inj if s == ts[0] else 2 * c) if s in ts else 0.0)
    lip = X + sum(cols.values())
    details.update(lipschitz=lip, rho=rho, window=window, retrain_deviation=X, correction=sum(cols.values()))
    value = min(lip, worst)
    assumption = (f"every training step map and its linearisation is {rho:g}-Lipschitz "
                  f"({'non-expansive' if rho == 1 else 'contractive' if rho < 1 else 'expansive'}); "
                  "not proven for a transformer")
    return ResidualBound(value, "formal", f"Lipschitz steps, {len(touched)} uses x eta x 2c, carried through the "
                         f"window K={window} ({where}); triangle inequality retrain vs correction",
                         [assumption], details=details)


def empirical_bound(residual_norm: float, how: str, parallel: float | None = None,
                    perpendicular: float | None = None) -> ResidualBound:
    """A measured (or user-supplied) residual: NOT a formal guarantee."""
    return ResidualBound(float(residual_norm), "empirical", how,
                         ["the residual was measured on this request's data: not a data-independent bound"],
                         parallel=parallel, perpendicular=perpendicular)
