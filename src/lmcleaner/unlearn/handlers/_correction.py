"""Shared runner of the correction methods (LMCleaner and its reference baselines).

A correction method computes a deviation at ``tau`` from one sweep over the
replayed trajectory (``unlearn.methods``), adds it to the trained state
(parameters and optimizer state) and measures the divergence guard. The
sweep starts at the first step that used a forgotten sample; it stops once
every injection's window is complete (later steps only carry deviations), so
the training steps replayed to recover past parameters are
``(first - restore point) + (end - first)``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Optional

from ..result import UnlearnError, UnlearnResult

log = logging.getLogger("lmcleaner.unlearn")


@dataclass
class LowRankOptions:
    """``hessian_mode=low_rank`` (``trainer.method_args.low_rank.*``): ``rank`` eigenpairs of
    the step Hessian from Lanczos, recomputed every ``refresh`` steps, ``iters`` Lanczos block
    iterations (null: ``2 rank + 10`` directions), ``block`` directions per batched HVP."""

    rank: int = 16
    refresh: int = 10
    iters: Optional[int] = None
    block: int = 4


@dataclass
class PropagationConfig:
    """Arguments of the LMCleaner propagation (``trainer.method_args``).

    ``K``: truncation window in steps (``>= 1``; ``>= tau`` is the full window);
    ``hessian_mode``: curvature backend (``exact`` double-backward HVP, ``GGN``,
    ``diag`` with a diag-mode log); ``damping``: ``lambda`` in
    ``d <- d - eta lambda d``; ``optimizer_map``: ``exact`` (the optimizer's own
    map evaluated on the linearised gradient) or ``linear`` (DESIGN's tangents);
    ``exact_impl``: ``double_backward|rev_rev|fwd_rev``;
    ``track_second_moment=false`` freezes AdamW's ``v`` (a baseline);
    ``low_rank``: options of ``hessian_mode=low_rank``.
    """

    K: int = 800
    hessian_mode: str = "exact"
    damping: float = 1e-4
    optimizer_map: str = "exact"
    exact_impl: str = "double_backward"
    track_second_moment: bool = True
    # where the curvature of a step is taken: midpoint (H(theta_s + D/2) D, the gradient secant
    # g(theta+D) - g(theta) to third order in the request's deviation D; exact/GGN) | recorded
    # (H(theta_s) D, DESIGN §3, second order) | auto: midpoint where the optimizer bounds every update
    # (AdamW, or clipping) at the sample level, else recorded. Same cost; unlearn/propagation.py has
    # the measurements.
    curvature_point: str = "auto"
    # propagation inside the window: linear (HVPs, DESIGN §3) | replay (exact replay, unlearn.windowed)
    propagation: str = "linear"
    carry: str = "frozen"  # propagation=replay, past the window: frozen | momentum | linear
    carry_hessian_mode: str = "exact"  # curvature of carry=linear
    tol: float = 0.0  # propagation=replay: > 0 extends a window until its estimated carry error is <= tol
    low_rank: LowRankOptions = field(default_factory=LowRankOptions)
    # linear propagation: replay the last ``tail`` steps before tau exactly from the corrected state, so
    # the optimizer's moments are rebuilt from gradients at the corrected parameters. null: automatic,
    # the momentum horizon (steps for beta1^n to fall below 0.1) when training continues after the
    # correction (online requests), else 0. Continued training grows a correction's error through its
    # first-moment residual (benchmarks/online.py); set it when you resume training from the result.
    tail: Optional[int] = None

    def validate(self) -> None:
        if self.curvature_point not in ("auto", "recorded", "midpoint"):
            raise ValueError(f"trainer.method_args.curvature_point={self.curvature_point!r}: use auto, midpoint or "
                             "recorded")

        if self.tail is not None and self.tail < 0:
            raise ValueError(f"trainer.method_args.tail={self.tail} must be >= 0 (or null: automatic)")
        if self.K < 1:
            raise ValueError(f"trainer.method_args.K={self.K}: the propagation window K must be >= 1 step")
        if self.propagation not in ("linear", "replay"):
            raise ValueError(f"trainer.method_args.propagation={self.propagation!r}: use linear or replay")


class CorrectionMethod:
    """Base of the handlers that add a computed deviation to the trained state."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    exact: ClassVar[bool] = False
    level: ClassVar[str] = "sample"

    def algorithm(self, cfg: Any):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------- error estimate
    def _probe_steps(self, session, touched: list[int], level: str) -> list[int]:
        """Restore points after the first use that an exact replay from it reaches within the
        probe budget (sample level only: the exact counterfactual is a replay without the ids)."""
        from ..windowed import window_boundary

        if level != "sample":
            return []
        first = touched[0]
        restore = session.log.restore_point_for(first).step
        budget = _probe_budget(session, first)
        points, p = [], window_boundary(session.log, first + 1, session.tau)
        while p < session.tau and p - restore <= budget:
            points.append(p)
            p = window_boundary(session.log, p + 1, session.tau)
        return points

    def tail_steps(self, session, cfg: Any, touched: list[int], level: str) -> int:
        """Steps before ``tau`` replayed exactly after the propagation (``PropagationConfig.tail``).
        The tail may hold later uses (it replays without the ids) but not the first: the
        propagation keeps at least that step. Sample level only."""
        tail = getattr(cfg, "tail", 0)
        if tail is None:
            tail = momentum_horizon(session.spec) if getattr(session, "continues_training", False) else 0
        if level != "sample" or self.reach(cfg) <= 0:
            return 0
        return max(0, min(int(tail), session.tau - touched[0] - 1))

    def _truncation_steps(self, session, touched: list[int], reach: int,
                          tau: int | None = None) -> tuple[int, int] | None:
        """``(a, b)``: two steps at the end of the last window (``b`` = its end) whose deviations
        show how much it was still changing when it was cut; ``None`` when it reaches ``tau``
        (the propagation's end; default the session's)."""
        tau = session.tau if tau is None else tau
        b = min(touched[-1] + reach, tau - 1) + 1
        if b >= tau:
            return None
        interval = int(session.log.meta.get("checkpoint_interval") or 0) or reach or 1
        return max(touched[-1], b - max(1, min(reach, interval))), b

    def _estimate(self, session, ids: list[int], touched: list[int], probes: list[int],
                  trunc: tuple[int, int] | None, corr) -> dict[str, Any]:
        """``estimated_error`` = linearisation + truncation, relative to the correction's size.

        - linearisation: the correction's relative error against one exact replay from the first
          use, at each restore point it reaches within the probe budget (a quarter of replay's
          cost); the last one, scaled by the learning rate from the first use to ``tau`` over
          that up to the probe (linearisation error accumulates as training moves);
        - truncation: past the window the deviation is carried unchanged, so the error is what it
          would still have changed. Its rate at the window's end, ``||d_b - d_a|| / ||d_b||`` per
          unit of learning rate, times the learning rate still to come, estimates it (the same
          rule as the windowed method's, ``unlearn.windowed``).
        A value near or above 1 means the correction is no better than doing nothing."""
        from ..windowed import extrapolated_error, norm_params, probe_errors, sub_params

        out: dict[str, Any] = {"probe_steps": 0, "estimate_parts": {}}
        parts = out["estimate_parts"]
        probes = [p for p in probes if p in corr.probe]
        log = session.log
        if probes:  # one exact counterfactual replay, compared with the prediction at each restore point
            rep, t0 = session.replayer, touched[0]
            before = rep.steps_run
            rep.seek(t0)
            errors = probe_errors(rep, ids, {p: corr.probe[p] for p in probes})
            out["probe_steps"] = rep.steps_run - before
            last, e = errors[-1]
            parts["linearisation"] = extrapolated_error(log, t0, last, session.tau, e)
            parts["linearisation_probes"] = errors
        if trunc is None:
            parts["truncation"] = 0.0
        elif trunc[1] in corr.probe:
            a, b = trunc
            db = corr.probe[b]
            da = corr.probe.get(a) or {n: v.new_zeros(v.shape) for n, v in db.items()}  # before the first use: 0
            nb = norm_params(db)
            change = norm_params(sub_params(db, da)) / nb if nb > 0 else 1.0
            seg, rest = log.lr_mass(a, b), log.lr_mass(b, session.tau)
            parts["truncation"] = change * rest / seg if seg > 0 else float("inf")
        if "linearisation" in parts and "truncation" in parts:
            out["estimated_error"] = parts["linearisation"] + parts["truncation"]
            out["estimate_source"] = "linearisation probe + truncation rate"
        elif "truncation" in parts and parts["truncation"] >= 1:
            out["estimated_error"] = parts["truncation"]  # already says: no better than doing nothing
            out["estimate_source"] = "truncation rate (no affordable linearisation probe)"
        else:
            out["estimated_error"] = None
            out["estimate_source"] = "none (no affordable probe segment)"
        return out

    def reach(self, cfg: Any) -> int:
        """Steps propagated after the last injection (the sweep stops there)."""
        return int(cfg.K)

    def run(self, session, ids: list[int], cfg: Any) -> UnlearnResult:
        t0 = time.perf_counter()
        touched = session.steps_for(ids)
        hessian_mode = getattr(cfg, "hessian_mode", None)
        level = getattr(cfg, "level", self.level)
        if hessian_mode == "diag" and session.log.storage != "diag" and self.reach(cfg) > 0:
            raise UnlearnError("hessian_mode=diag needs a log recorded with training_logger.storage=diag "
                               "(or compute_diag_h=true); use hessian_mode=GGN or exact")
        try:
            algo = self.algorithm(cfg)
        except ValueError as err:
            raise UnlearnError(str(err)) from None
        algo.router_aux = session.router_aux  # MoE: the router losses are part of the step loss
        forget = touched if level == "batch" else ids
        tail = self.tail_steps(session, cfg, touched, level)
        tau_c = session.tau - tail  # the propagation's end; the tail replays tau_c .. tau - 1 exactly
        all_uses, touched = touched, [u for u in touched if u < tau_c]  # later uses: excluded by the tail
        start = touched[0]
        end = min(tau_c, touched[-1] + self.reach(cfg) + 1)
        restore = session.log.restore_point_for(start).step
        steps_iter, recovery_cost = session.iter_steps(start, end)
        diag = session.log.diag_provider() if hessian_mode == "diag" else None
        probes = [p for p in self._probe_steps(session, touched, level) if p <= tau_c]
        trunc = self._truncation_steps(session, touched, self.reach(cfg), tau_c)
        corr = algo.compute(session.template, steps_iter, session.spec, forget, tau_c, diag,
                            last_injection=touched[-1], probe_steps=[p for p in (*probes, *(trunc or ())) if p])
        from ..methods import apply_correction

        theta_c, opt_c = session.replayer.state_at(tau_c)
        params, new_state = apply_correction(theta_c, opt_c, corr)
        recovery = recovery_cost()  # steps replayed (light) or gradients (heavy) to recover past states
        theta, tail_cost = theta_c, 0.0
        if tail:  # exact replay of the tail from the corrected state, then theta_tau for the guard
            rep = session.replayer
            before = rep.steps_run
            rep.load_state(params, new_state)
            params, new_state = rep.continue_without(ids, session.tau)
            theta, _ = rep.state_at(session.tau)
            tail_cost = float(rep.steps_run - before)
        estimate = self._estimate(session, ids, touched, probes, trunc, corr)
        seconds = time.perf_counter() - t0
        guard = session.retain_guard(theta, params, ids)
        audit = corr.audit.to_json()
        extra = recovery + estimate["probe_steps"] + tail_cost
        if audit.get("grad_equivalents_measured") is not None:
            audit["grad_equivalents_measured_total"] = audit["grad_equivalents_measured"] + extra
        if hessian_mode == "diag":  # the diagonal was paid for at record time: say how much
            audit["record_time_grad_equivalents"] = _diag_record_cost(session, end - start)
        info = {**audit, "method": self.name, "steps_touched": all_uses, "recovery_steps": recovery,
                "storage": session.log.storage, "optimizer_map": getattr(cfg, "optimizer_map", "exact"),
                "grad_equivalents_total": audit["grad_equivalents"] + extra,
                "seconds": seconds, "sweep_range": [start, end], "restored_from": restore, "tail_steps": tail,
                **estimate, **guard}
        if guard["diverged"]:
            log.warning("%s: the correction raised the retain loss from %.3f to %.3f; the linearised propagation "
                        "is probably outside its regime (large steps or a large deletion): prefer method=replay",
                        self.name, guard["retain_loss_before"], guard["retain_loss_after"])
        return UnlearnResult(self.name, ids, session.tau, params, new_state, info)


def momentum_horizon(spec, fraction: float = 0.1) -> int:
    """Steps after which the first moment (AdamW ``beta1``, SGD ``momentum``) keeps less than
    ``fraction`` of what it held: ``ceil(ln fraction / ln beta)`` (0 without a first moment)."""
    beta = spec.betas[0] if spec.name.lower() == "adamw" else spec.momentum
    return math.ceil(math.log(fraction) / math.log(beta)) if 0 < beta < 1 else 0


def _diag_record_cost(session, steps: int) -> float:
    """Gradient-equivalents the recorder spent on the diagonals of ``steps`` steps: a
    Hutchinson probe is one HVP (measured ~2 gradients) per probe; the empirical Fisher
    squares a gradient the step computed anyway (~0)."""
    from ..hvp import HVP_COST_IN_GRADS

    meta = session.log.meta
    if meta.get("diag_estimator", "hutchinson") != "hutchinson":
        return 0.0
    probes = int((meta.get("settings") or {}).get("diag_probes", 1) or 1)
    return steps * probes * HVP_COST_IN_GRADS["exact"]


def _probe_budget(session, first_use: int) -> int:
    """At most this many replayed steps are spent on the error probe."""
    replay = session.tau - session.log.restore_point_for(first_use).step
    return max(int(session.log.meta.get("checkpoint_interval") or 0), replay // 4)


class LMCleanerMethod(CorrectionMethod):
    """LMCleaner at one level: ``algorithm_class`` names the ``unlearn.methods`` class it drives
    (imported when it runs: registering the methods must not import torch)."""

    algorithm_class: ClassVar[str]
    certifiable: ClassVar[bool] = True  # the formal residual bound applies (unlearn/certify/bound.py)

    @dataclass
    class Config(PropagationConfig):
        pass

    def run(self, session, ids: list[int], cfg: PropagationConfig) -> UnlearnResult:
        if cfg.propagation == "replay":
            return self._run_windowed(session, ids, cfg)
        return super().run(session, ids, cfg)

    def _run_windowed(self, session, ids: list[int], cfg: PropagationConfig) -> UnlearnResult:
        from ..windowed import WindowedReplay

        if self.level != "sample":
            raise UnlearnError("propagation=replay is sample level: use trainer=LMCleanerSample "
                               "(a forgotten batch is a sample-level request for all its samples)")
        try:
            algo = WindowedReplay(K=cfg.K, tol=cfg.tol, carry=cfg.carry, carry_hessian_mode=cfg.carry_hessian_mode,
                                  damping=cfg.damping)
        except ValueError as err:
            raise UnlearnError(str(err)) from None
        theta, _ = session.replayer.state_at(session.tau)
        params, new_state, info = algo.compute(session, ids)
        guard = session.retain_guard(theta, params, ids)
        info = {**info, "method": self.name, "level": "sample", "hessian_mode": None, "damping": cfg.damping, **guard}
        return UnlearnResult(self.name, ids, session.tau, params, new_state, info)

    def algorithm(self, cfg: PropagationConfig):
        from .. import methods

        return getattr(methods, self.algorithm_class)(K=cfg.K, hessian_mode=cfg.hessian_mode, damping=cfg.damping,
                              track_second_moment=cfg.track_second_moment, optimizer_map=cfg.optimizer_map,
                              exact_impl=cfg.exact_impl, hvp_options=hvp_options(cfg),
                              curvature_point=cfg.curvature_point)


def hvp_options(cfg: Any) -> dict[str, Any] | None:
    """Backend options of the chosen ``hessian_mode`` (only ``low_rank`` has any)."""
    return asdict(cfg.low_rank) if getattr(cfg, "hessian_mode", None) == "low_rank" else None
