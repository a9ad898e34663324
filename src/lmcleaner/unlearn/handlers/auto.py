"""``auto``: per request, the cheapest method whose estimated error is within ``max_error``.

The decision, recorded in the result (``info["auto"]``) and so in the audit:

1. Predict the cost of each candidate from the log alone (no model
   evaluation): exact ``replay`` costs ``tau - r`` training steps (``r`` the
   restore point before the first use); the windowed LMCleaner
   (``propagation=replay``, ``unlearn.windowed``) costs, per window, the steps
   from the restore point before its use plus the window itself, up to the
   first restore point at or after ``use + K``.
2. Requests for which the approximation cannot pay off are sent to replay
   straight away, without trying anything: when the windowed candidate's
   last window reaches ``tau`` (recent uses: it *is* replay), when the samples
   recur in several epochs (measured: carried windows then stay at 0.13 or
   worse for 0.8x replay's cost), or when its predicted cost exceeds
   ``max_cost_ratio`` times replay's. This keeps ``auto`` at replay's cost
   where replay is the answer.
3. Otherwise the candidate runs with an adaptive window (``tol = max_error``)
   whose extension is capped so that it stays within ``max_cost_ratio`` of
   replay's cost, and stops early when its estimate cannot get there; it is
   returned if its own ``estimated_error`` (see
   ``unlearn.windowed``) is at most ``max_error`` and the divergence guard is
   silent. Else the answer is exact replay, *continued* from the end of the
   attempt's first window (that window is the exact counterfactual up to its
   end, from the recorded state at the first use): the result is the replay
   result, and a rejected attempt costs only its windows after the first
   (both recorded; the cost reported is the sum).

``max_error`` is an estimated *relative parameter error*
``||theta_hat - theta_re|| / ||theta - theta_re||``; ``0`` forces replay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..registry import get_method, method_config, register_method
from ..result import UnlearnResult


def predicted_window_cost(session, uses: list[int], K: int) -> tuple[float, int]:
    """(training steps, end of the last window) of the windowed method with fixed windows of ``K``."""
    from ..windowed import window_boundary

    log, tau = session.log, session.tau
    cost, i, end = 0.0, 0, uses[0]
    while i < len(uses):
        t = uses[i]
        end = window_boundary(log, t + K, tau)
        cost += (t - log.restore_point_for(t).step) + (end - t)
        while i < len(uses) and uses[i] < end:
            i += 1
    return cost, end  # theta_tau itself is the trainer's final checkpoint: free


@register_method
class Auto:
    """the cheapest method whose estimated error is within max_error, else exact replay (recorded)"""

    name = "auto"
    aliases = ("Auto",)
    exact = False

    @dataclass
    class Config:
        max_error: float = 0.1  # accepted estimated relative parameter error (0: always replay)
        K: int = 40  # first window of the windowed candidate (extended adaptively up to the budget)
        carry: str = "frozen"  # carry of the windowed candidate: frozen | momentum | linear
        max_cost_ratio: float = 0.75  # an approximation is tried only below this fraction of replay's cost

        def validate(self) -> None:
            if self.max_error < 0:
                raise ValueError(f"trainer.method_args.max_error={self.max_error} must be >= 0")
            if self.K < 1:  # a window of 0 steps would never advance past a use
                raise ValueError(f"trainer.method_args.K={self.K}: the first window K must be >= 1 step")
            if not 0 < self.max_cost_ratio <= 1:
                raise ValueError(f"trainer.method_args.max_cost_ratio={self.max_cost_ratio}: use a value in (0, 1]")

    def run(self, session, ids: list[int], cfg: Config) -> UnlearnResult:
        t0 = time.perf_counter()
        uses = session.steps_for(ids)
        tau = session.tau
        replay_cost = float(tau - session.log.restore_point_for(uses[0]).step)
        window_cost, window_end = predicted_window_cost(session, uses, cfg.K)
        candidates: list[dict[str, Any]] = [
            {"method": "replay", "predicted_error": 0.0, "predicted_cost": replay_cost},
            {"method": "LMCleanerSampleLevel", "args": {"propagation": "replay", "K": cfg.K, "carry": cfg.carry,
                                                         "tol": cfg.max_error},
             "predicted_error": None if window_end < tau else 0.0, "predicted_cost": window_cost}]
        budget = cfg.max_cost_ratio * replay_cost
        if cfg.max_error <= 0:
            reason = "max_error=0: exact replay requested"
        elif window_end >= tau:
            reason = "the uses are recent: a window from the first use reaches tau, i.e. it is replay"
        elif len({session.log.record(u).epoch for u in uses}) > 1:
            reason = ("the samples recur in several epochs: each later use relearns them, so the carried "
                      "deviations are large and replay is the right answer")
        elif window_cost > budget:
            reason = (f"the approximation's predicted cost {window_cost:.0f} exceeds {cfg.max_cost_ratio} x "
                      f"replay's ({replay_cost:.0f}): uses recur or are too late to pay off")
        else:
            reason = None
        decision: dict[str, Any] = {"max_error": cfg.max_error, "max_cost_ratio": cfg.max_cost_ratio,
                                    "candidates": candidates}
        spent, algo = 0.0, None
        if reason is None:
            from ..windowed import WindowedReplay

            cand = candidates[1]
            algo = WindowedReplay(K=cfg.K, tol=cfg.max_error, carry=cfg.carry,
                                  max_window=max(cfg.K, int(budget - window_cost) + cfg.K))
            theta, _ = session.replayer.state_at(tau)
            params, new_state, info = algo.compute(session, ids)
            guard = session.retain_guard(theta, params, ids)
            spent = float(info["grad_equivalents_total"])
            cand.update(measured_estimated_error=info["estimated_error"], cost=spent, diverged=guard["diverged"],
                        windows=len(info["windows"]), function_check=info.get("function_check"))
            function_flag = bool((info.get("function_check") or {}).get("flagged"))
            if info["estimated_error"] <= cfg.max_error and not guard["diverged"] and not function_flag:
                decision.update(chosen="LMCleanerSampleLevel", reason="estimated error within max_error")
                info = {**info, **guard, "method": self.name, "chosen": "LMCleanerSampleLevel", "auto": decision,
                        "seconds": time.perf_counter() - t0}
                return UnlearnResult(self.name, ids, tau, params, new_state, info)
            if guard["diverged"]:
                reason = "the approximation raised the retain loss (divergence guard)"
            elif info["estimated_error"] > cfg.max_error:
                reason = f"the approximation's estimated error {info['estimated_error']:.3g} exceeds max_error"
            else:
                reason = (f"on the forgotten rows the approximation moves the model {info['function_check']['ratio']:.3g}x "
                          "as far as the removal did at its window's end: worse than doing nothing in function space")
        exact = getattr(algo, "exact_state", None) if reason is not None and spent else None
        if exact is not None and exact[0] < tau:
            # the rejected attempt's first window is the exact counterfactual up to its end: exact
            # replay continues from there (bit-identical to replay from the start, without repeating it)
            end, theta_e, opt_e = exact
            rep = session.replayer
            before = rep.steps_run
            rep.seek(end)
            rep.load_state(theta_e, opt_e)
            params, opt_state = rep.continue_without(ids, tau)
            steps = float(rep.steps_run - before)
            decision.update(chosen="replay", reason=reason, replay_continued_from=end)
            info = {"method": self.name, "chosen": "replay", "auto": decision, "estimated_error": 0.0,
                    "steps_touched": uses, "restored_from": session.log.restore_point_for(uses[0]).step,
                    "recovery_steps": spent + steps, "grad_equivalents": spent + steps,
                    "grad_equivalents_total": spent + steps, "K": None, "hessian_mode": None,
                    "seconds": time.perf_counter() - t0}
            return UnlearnResult(self.name, ids, tau, params, opt_state, info)
        replay = get_method("replay")
        res = replay().run(session, ids, method_config(replay))
        decision.update(chosen="replay", reason=reason)
        info = {**res.info, "method": self.name, "chosen": "replay", "auto": decision, "estimated_error": 0.0,
                "grad_equivalents_total": res.info["grad_equivalents_total"] + spent,
                "grad_equivalents": res.info["grad_equivalents"] + spent, "seconds": time.perf_counter() - t0}
        return UnlearnResult(self.name, ids, tau, res.params, res.opt_state, info)
