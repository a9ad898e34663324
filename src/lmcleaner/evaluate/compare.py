"""Run several unlearning methods on one request and measure each against the oracle.

Shared by ``lmcleaner demo`` and ``benchmarks/fidelity.py``: one row per
(method, hessian_mode, K) with the relative parameter error to exact
retraining, next-token KL to the oracle on forget and retain samples, wall
time and gradient-equivalents (cost relative to exact replay).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .fidelity import kl_to_oracle

Grid = Sequence[tuple[str, dict[str, Any]]]


def default_grid(tau: int, Ks: Sequence[int], hessian_modes: Sequence[str], level: str = "both") -> list:
    """replay, LMCleaner (sample level: each mode x each K and the full window;
    batch level: first mode, full window), rollback, sgd_formula, GradAscent."""
    grid: list[tuple[str, dict[str, Any]]] = [("replay", {})]
    Ks_full = sorted({int(k) for k in Ks if 0 < int(k) < tau} | {tau})
    for mode in hessian_modes:
        for K in Ks_full:
            grid.append(("LMCleanerSampleLevel", {"hessian_mode": mode, "K": K}))
    if level == "both":
        grid.append(("LMCleanerBatchLevel", {"hessian_mode": hessian_modes[0], "K": tau}))
    grid += [("rollback", {}), ("sgd_formula", {"hessian_mode": hessian_modes[0], "K": tau}),
             ("GradAscent", {"lr": 1e-3, "steps": 5})]
    return grid


def row_name(method: str, kw: dict[str, Any]) -> str:
    short = {"LMCleanerSampleLevel": "LMC-sample", "LMCleanerBatchLevel": "LMC-batch"}.get(method, method)
    parts = [short] + [str(kw[k]) if k == "hessian_mode" else f"K{kw[k]}" for k in ("hessian_mode", "K") if k in kw]
    return "-".join(parts)


def relative_error(params: dict[str, torch.Tensor], theta: dict[str, torch.Tensor],
                   oracle: dict[str, torch.Tensor]) -> float:
    """``||params - oracle|| / ||theta - oracle||`` in float64 over the trainable parameters."""
    num = sum(float(((params[n].double() - oracle[n].double()) ** 2).sum()) for n in oracle)
    den = sum(float(((theta[n].double() - oracle[n].double()) ** 2).sum()) for n in oracle)
    return math.sqrt(num / den) if den > 0 else float("nan")


def _mean_kl(model, oracle_model, items, pad_id: int) -> float | None:
    if not items:
        return None
    sums, counts = kl_to_oracle(model, oracle_model, items, pad_token_id=pad_id)
    total = sum(c for c in counts)
    return sum(s for s, c in zip(sums, counts) if c) / total if total else None


def compare_methods(session, ids: list[int], grid: Grid, oracle: dict[str, torch.Tensor],
                    forget_items: Sequence[dict] = (), retain_items: Sequence[dict] = (),
                    on_result: Callable[[str, Any], None] | None = None, progress: bool = True) -> list[dict]:
    """Rows for every method in ``grid``. ``on_result(name, UnlearnResult)`` sees each result (e.g. to export it)."""
    from ..telemetry.progress import progress_bar

    theta = session.replayer.state_at(session.tau)[0]
    pad_id = session.trainer.dataset.pad_token_id
    oracle_model = session.model_with(oracle)
    rows, replay_cost, replay_seconds = [], None, None
    saved = session.progress, session.progress_leave
    session.progress, session.progress_leave = progress, False  # per-method bars are transient: this one stays
    for method, kw in progress_bar(list(grid), desc="unlearning methods", enabled=progress, unit="method"):
        res = session.run(method, ids, **kw)
        name = row_name(method, kw)
        model = session.model_with(res.params)
        cost = float(res.info.get("grad_equivalents_total") or 0.0)
        if method == "replay":
            replay_cost, replay_seconds = cost, res.info["seconds"]
        rows.append({
            "name": name, "method": method, "hessian_mode": kw.get("hessian_mode"), "K": kw.get("K"),
            "rel_param_error": relative_error(res.params, theta, oracle),
            "kl_forget": _mean_kl(model, oracle_model, forget_items, pad_id),
            "kl_retain": _mean_kl(model, oracle_model, retain_items, pad_id),
            "seconds": res.info.get("seconds"), "grad_equivalents": cost,
            "recovery_steps": res.info.get("recovery_steps"), "steps_touched": len(res.info.get("steps_touched", [])),
            "diverged": res.info.get("diverged"),
        })
        if on_result is not None:
            on_result(name, res)
    session.progress, session.progress_leave = saved
    for r in rows:
        r["replay_seconds"] = replay_seconds
        r["cost_vs_replay"] = r["grad_equivalents"] / replay_cost if replay_cost else None
    return rows
