"""``replay``: exact unlearning by replaying the run without the samples (DESIGN §3).

Restores the checkpoint at or before the first use and replays to ``tau``
with the samples removed from every batch (normalisers recomputed): bit for
bit the model ``lmcleaner retrain`` produces. Cost ``tau - restore`` steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..registry import register_method
from ..result import UnlearnResult


@register_method
class Replay:
    """exact: replay from the checkpoint before the first use without the samples (= retraining)"""

    name = "replay"
    aliases = ("Replay",)
    exact = True

    @dataclass
    class Config:
        pass

    def run(self, session, ids: list[int], cfg: Config) -> UnlearnResult:
        t0 = time.perf_counter()
        touched = session.steps_for(ids)
        res = session.replayer.counterfactual(ids, start=touched[0], end=session.tau)
        info = {"method": self.name, "steps_touched": touched, "restored_from": res.restored_from,
                "recovery_steps": res.steps_replayed, "grad_equivalents_total": float(res.steps_replayed),
                "grad_equivalents": float(res.steps_replayed), "seconds": time.perf_counter() - t0,
                "K": None, "hessian_mode": None}
        return UnlearnResult(self.name, ids, session.tau, res.params, res.opt_state, info)
