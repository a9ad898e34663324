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

# The fine-tuning baselines open-unlearning users compare against, exactly as
# ``trainer=NAME`` runs them (open-unlearning's TOFU defaults: AdamW lr 1e-5,
# 10 epochs, 32 rows per step, ...). docs/benchmarks.md has them at the run's
# own learning rate too (``lr_relative=true``), where they overshoot.
FINETUNE_BASELINES: tuple[str, ...] = ("GradAscent", "GradDiff", "NPO", "SimNPO")


def baseline_grid(**args: Any) -> list[tuple[str, dict[str, Any]]]:
    """GradAscent, GradDiff, NPO, SimNPO at their defaults (``args`` override them, e.g. ``lr``)."""
    return [(m, dict(args)) for m in FINETUNE_BASELINES]


def default_grid(tau: int, Ks: Sequence[int], hessian_modes: Sequence[str], level: str = "both") -> list:
    """replay, LMCleaner (sample level: each mode x each K and the full window;
    batch level: first mode, full window), rollback, sgd_formula, and the
    fine-tuning baselines (``baseline_grid``)."""
    grid: list[tuple[str, dict[str, Any]]] = [("replay", {})]
    Ks_full = sorted({int(k) for k in Ks if 0 < int(k) < tau} | {tau})
    for mode in hessian_modes:
        for K in Ks_full:
            grid.append(("LMCleanerSampleLevel", {"hessian_mode": mode, "K": K}))
    if level == "both":
        grid.append(("LMCleanerBatchLevel", {"hessian_mode": hessian_modes[0], "K": tau}))
    grid += [("rollback", {}), ("sgd_formula", {"hessian_mode": hessian_modes[0], "K": tau}), *baseline_grid()]
    return grid


def windowed_grid(Ks: Sequence[int], tols: Sequence[float] = (0.1,)) -> list[tuple[str, dict[str, Any]]]:
    """LMCleaner with exact windows (``propagation=replay``): fixed windows of each ``K`` and
    adaptive windows that stop when their estimated error is within each ``tol``."""
    grid = [("LMCleanerSampleLevel", {"propagation": "replay", "K": int(K), "carry": "frozen"}) for K in Ks]
    first = int(Ks[0]) if Ks else 20
    grid += [("LMCleanerSampleLevel", {"propagation": "replay", "K": first, "carry": "frozen", "tol": float(t)})
             for t in tols]
    return grid


def row_name(method: str, kw: dict[str, Any]) -> str:
    short = {"LMCleanerSampleLevel": "LMC-sample", "LMCleanerBatchLevel": "LMC-batch"}.get(method, method)
    parts = [short] + [str(kw[k]) if k == "hessian_mode" else f"K{kw[k]}" for k in ("hessian_mode", "K") if k in kw]
    if "lr" in kw:  # fine-tuning baselines: "x" marks a multiple of the run's learning rate
        parts.append(f"lr{'x' if kw.get('lr_relative') else ''}{kw['lr']:g}")
    name = "-".join(parts)
    if kw.get("propagation") == "replay":  # exact windows: the carry and the adaptive tolerance
        name = name.replace("LMC-sample", "LMC-window") + f"-{kw.get('carry', 'frozen')}"
        if kw.get("tol"):
            name += f"-tol{kw['tol']}"
    elif method == "auto" and kw.get("carry"):
        name += f"-{kw['carry']}"
    return name


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


def _mia_auc(model, forget_items: Sequence[dict], holdout_items: Sequence[dict], pad_id: int) -> float | None:
    """Best of the LOSS and min-k% attack AUCs, forget (members) vs holdout (non-members)."""
    if not forget_items or not holdout_items:
        return None
    from .mia import auc, min_k_score
    from .scoring import score_items

    f, h = score_items(model, forget_items, pad_id), score_items(model, holdout_items, pad_id)
    aucs = [auc([-x.loss for x in f], [-x.loss for x in h]),
            auc([min_k_score(x.logprobs) for x in f], [min_k_score(x.logprobs) for x in h])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return max(aucs, key=lambda a: abs(a - 0.5)) if aucs else None


def compare_methods(session, ids: list[int], grid: Grid, oracle: dict[str, torch.Tensor],
                    forget_items: Sequence[dict] = (), retain_items: Sequence[dict] = (),
                    on_result: Callable[[str, Any], None] | None = None, progress: bool = True,
                    holdout_items: Sequence[dict] = (), do_nothing_row: bool = False,
                    include_original: bool = False) -> list[dict]:
    """Rows for every method in ``grid`` (first, with ``do_nothing_row``, the untouched model;
    ``include_original`` appends the same row named ``original``, as the demo report names it).

    Function space beside parameter space: ``kl_forget_ratio`` is the KL to the
    oracle on the forget set divided by the untouched model's (1 = no better than
    doing nothing), ``mia_gap`` the distance of the MIA AUC (forget vs
    ``holdout_items``) to the oracle's. Cost: gradient-equivalents and wall time,
    each also as a ratio to exact replay's in the same run.
    ``on_result(name, UnlearnResult)`` sees each result (e.g. to export it)."""
    from ..telemetry.progress import progress_bar

    theta = session.replayer.state_at(session.tau)[0]
    pad_id = session.trainer.dataset.pad_token_id
    oracle_model = session.model_with(oracle)
    original = session.model_with(theta)
    kl0 = _mean_kl(original, oracle_model, forget_items, pad_id)
    auc_oracle = _mia_auc(oracle_model, forget_items, holdout_items, pad_id)

    def fn_space(model) -> dict[str, Any]:
        kl = _mean_kl(model, oracle_model, forget_items, pad_id)
        auc_m = _mia_auc(model, forget_items, holdout_items, pad_id)
        # below 1e-9 nats the untouched model's KL is rounding noise: no ratio
        return {"kl_forget": kl, "kl_forget_ratio": (kl / kl0) if (kl is not None and kl0 and kl0 > 1e-9) else None,
                "kl_retain": _mean_kl(model, oracle_model, retain_items, pad_id), "mia_auc": auc_m,
                "mia_gap": abs(auc_m - auc_oracle) if (auc_m is not None and auc_oracle is not None) else None}

    untouched = {"name": "do-nothing", "method": "none", "hessian_mode": None, "K": None, "rel_param_error": 1.0,
                 **fn_space(original), "seconds": 0.0, "grad_equivalents": 0.0, "recovery_steps": 0,
                 "steps_touched": 0, "diverged": False, "estimated_error": None}
    rows = [dict(untouched)] if do_nothing_row else []
    replay_cost, replay_seconds = None, None
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
            "chosen": res.info.get("chosen"),
            "rel_param_error": relative_error(res.params, theta, oracle), **fn_space(model),
            "seconds": res.info.get("seconds"), "grad_equivalents": cost,
            "recovery_steps": res.info.get("recovery_steps"), "steps_touched": len(res.info.get("steps_touched", [])),
            "diverged": res.info.get("diverged"), "estimated_error": res.info.get("estimated_error"),
            "function_check_ratio": (res.info.get("function_check") or {}).get("ratio"),
        })
        if on_result is not None:
            on_result(name, res)
    session.progress, session.progress_leave = saved
    for r in rows:
        r["replay_seconds"] = replay_seconds
        r["cost_vs_replay"] = r["grad_equivalents"] / replay_cost if replay_cost else None
        r["wall_vs_replay"] = (r["seconds"] / replay_seconds) if (replay_seconds and r["seconds"] is not None) else None
    if include_original:
        rows.append({**untouched, "name": "original", "method": "original"})
    return rows


EVAL_COLUMNS = ("forget_quality", "model_utility", "mia_auc")


def merge_eval(rows: list[dict], summary: dict[str, Any]) -> None:
    """Add ``evaluate_models``' headline metrics to the rows (matched by name), and rows for the
    original model and the oracle where ``rows`` has none (their KLs then come from the evaluation,
    whose retain rows and templates differ from ``compare_methods``': prefer ``include_original``)."""
    models = summary.get("models", summary)
    for r in rows:
        m = models.get(r["name"], {})
        for key in EVAL_COLUMNS:
            r[key] = m.get(key)
    for base in ("original", "oracle"):
        if any(r["name"] == base for r in rows):
            continue
        m = models.get(base, {})
        rows.append({"name": base, "method": base, "rel_param_error": 1.0 if base == "original" else 0.0,
                     **{k: m.get(k) for k in ("kl_forget", "kl_retain", *EVAL_COLUMNS)}})
