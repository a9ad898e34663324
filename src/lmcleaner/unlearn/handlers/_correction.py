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
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from ..methods import apply_correction
from ..result import UnlearnError, UnlearnResult

log = logging.getLogger("lmcleaner.unlearn")


@dataclass
class PropagationConfig:
    """Arguments of the LMCleaner propagation (``trainer.method_args``).

    ``K``: truncation window in steps (``>= 1``; ``>= tau`` is the full window);
    ``hessian_mode``: curvature backend (``exact`` double-backward HVP, ``GGN``,
    ``diag`` with a diag-mode log); ``damping``: ``lambda`` in
    ``d <- d - eta lambda d``; ``optimizer_map``: ``exact`` (the optimizer's own
    map evaluated on the linearised gradient) or ``linear`` (DESIGN's tangents);
    ``exact_impl``: ``double_backward|rev_rev|fwd_rev``;
    ``track_second_moment=false`` freezes AdamW's ``v`` (a baseline).
    """

    K: int = 800
    hessian_mode: str = "exact"
    damping: float = 1e-4
    optimizer_map: str = "exact"
    exact_impl: str = "double_backward"
    track_second_moment: bool = True

    def validate(self) -> None:
        if self.K < 1:
            raise ValueError(f"trainer.method_args.K={self.K}: the propagation window K must be >= 1 step")


class CorrectionMethod:
    """Base of the handlers that add a computed deviation to the trained state."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    exact: ClassVar[bool] = False
    level: ClassVar[str] = "sample"

    def algorithm(self, cfg: Any):  # pragma: no cover - abstract
        raise NotImplementedError

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
        start = touched[0]
        end = min(session.tau, touched[-1] + self.reach(cfg) + 1)
        restore = session.log.restore_point_for(start).step
        steps_iter = session.replayer.iter_steps(start, end)
        diag = session.log.diag_provider() if hessian_mode == "diag" else None
        corr = algo.compute(session.template, steps_iter, session.spec, forget, session.tau, diag,
                            last_injection=touched[-1])
        theta, opt_state = session.replayer.state_at(session.tau)
        params, new_state = apply_correction(theta, opt_state, corr)
        seconds = time.perf_counter() - t0
        guard = session.retain_guard(theta, params, ids)
        audit = corr.audit.to_json()
        recovery = (start - restore) + (end - start)  # training steps replayed to recover past parameters
        info = {**audit, "method": self.name, "steps_touched": touched, "recovery_steps": recovery,
                "grad_equivalents_total": audit["grad_equivalents"] + recovery, "seconds": seconds,
                "sweep_range": [start, end], "restored_from": restore, **guard}
        if guard["diverged"]:
            log.warning("%s: the correction raised the retain loss from %.3f to %.3f; the linearised propagation "
                        "is probably outside its regime (large steps or a large deletion): prefer method=replay",
                        self.name, guard["retain_loss_before"], guard["retain_loss_after"])
        return UnlearnResult(self.name, ids, session.tau, params, new_state, info)


class LMCleanerMethod(CorrectionMethod):
    """LMCleaner at one level: ``Algorithm`` is the ``unlearn.methods`` class it drives."""

    Algorithm: ClassVar[type]

    @dataclass
    class Config(PropagationConfig):
        pass

    def algorithm(self, cfg: PropagationConfig):
        return self.Algorithm(K=cfg.K, hessian_mode=cfg.hessian_mode, damping=cfg.damping,
                              track_second_moment=cfg.track_second_moment, optimizer_map=cfg.optimizer_map,
                              exact_impl=cfg.exact_impl)
