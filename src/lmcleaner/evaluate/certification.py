"""What certified removal costs and buys: membership inference and utility against epsilon.

For one unlearned result ``theta_hat`` and its exact-retrain oracle ``theta'``,
each noise *variant* (where the residual bound comes from: ``formal``,
``formal_lipschitz``, ``empirical``, ``empirical_subspace``) and each epsilon,
``certify_result`` draws the calibrated noise ``N`` (seeded, ``draws`` times)
and two models are evaluated on the same rows:

- ``certified = theta_hat + N``;
- ``noised oracle = theta' + N`` (the *same* draw): the fair comparison. The
  guarantee says these two are (epsilon, delta)-indistinguishable, so a
  membership-inference attack should do no better on the first.

Membership inference: forget rows (members of the original training set) vs
held-out rows (never trained on), LOSS / zlib / min-k% / min-k%++ AUC
(``evaluate/mia.py``); ``best`` is the largest AUC over the four attacks.
Utility: retain loss, retain ROUGE-L and TOFU model utility (``evaluate/runner.py``).
Per (variant, epsilon) the row holds the means over draws and whether the
target is met: ``|best AUC(certified) - best AUC(noised oracle)| <= auc_tol``
and ``model utility(certified) >= (1 - utility_tol) x model utility(oracle)``.
``epsilon = inf`` is the un-noised result next to the un-noised oracle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .mia import ATTACKS

VARIANTS = {
    "formal": {"bound": "formal"},
    "formal_lipschitz": {"bound": "formal", "assume": "lipschitz"},
    "empirical": {"bound": "empirical"},
    "empirical_subspace": {"bound": "empirical"},  # subspace_rank set by the sweep
}
UTILITY_KEYS = ("model_utility", "retain_loss", "retain_rougeL", "retain_prob")


def _best_auc(summary: dict[str, Any]) -> float | None:
    vals = [summary.get(f"mia_auc_{a}") for a in ATTACKS]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return max(vals) if vals else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def certification_sweep(session, result, oracle: dict, data, epsilons: Sequence[float],
                        variants: Sequence[str] = ("formal", "empirical"), *, delta: float = 1e-5,
                        draws: int = 1, rank: int = 16, seed: int = 0, max_new_tokens: int = 24,
                        auc_tol: float = 0.02, utility_tol: float = 0.10, curvature_rows: int = 32,
                        progress: bool = True) -> dict[str, Any]:
    """Rows (one per variant x epsilon) and the un-noised references; see the module docstring.

    ``result``: an ``UnlearnResult`` of ``session``; ``oracle``: the exact-retrain
    trainable parameters; ``data``: an ``EvalData`` with forget, retain and holdout.
    A variant whose bound does not exist for this run (e.g. ``formal`` without
    clipping) is reported with its one-line reason instead of numbers."""
    from ..unlearn.certify import certify_result, curvature_basis
    from ..unlearn.result import UnlearnError
    from .runner import evaluate_models

    theta = session.replayer.state_at(session.tau)[0]
    models: dict[str, Any] = {"original": session.model_with(theta), "oracle": session.model_with(oracle),
                              "unlearned": session.model_with(result.params)}
    plan: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    basis = None
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"unknown certification variant {variant!r}: use {sorted(VARIANTS)}")
        cfg_base = {**VARIANTS[variant], "delta": delta, "curvature_rows": curvature_rows}
        if variant == "empirical_subspace":
            cfg_base["subspace_rank"] = rank
            if basis is None:
                basis = curvature_basis(session, result.params, result.forget_ids, rank, curvature_rows)
        for eps in epsilons:
            if not math.isfinite(eps):
                continue
            for k in range(draws):
                try:
                    cert = certify_result(session, result, {**cfg_base, "epsilon": eps, "seed": seed + k},
                                          oracle=oracle, basis=basis if variant == "empirical_subspace" else None)
                except UnlearnError as err:
                    skipped[variant] = str(err)
                    break
                noise = {n: cert.params[n].float() - result.params[n].float() for n in cert.params}
                tag = f"{variant}/eps={eps:g}/draw={k}"
                models[f"certified:{tag}"] = session.model_with(cert.params)
                models[f"noised_oracle:{tag}"] = session.model_with(
                    {n: (oracle[n].float() + noise[n]).to(oracle[n].dtype) for n in oracle})
                plan.append({"variant": variant, "epsilon": eps, "draw": k, "tag": tag,
                             "certification": cert.info["certification"]})
            if variant in skipped:
                break
    _, summary = evaluate_models(models, data, oracle="oracle", original="original",
                                 tokenizer=session.trainer.tokenizer, max_new_tokens=max_new_tokens,
                                 progress=progress)
    ms = summary["models"]
    refs = {name: {"best_auc": _best_auc(ms[name]), **{f"auc_{a}": ms[name].get(f"mia_auc_{a}") for a in ATTACKS},
                   **{k: ms[name].get(k) for k in UTILITY_KEYS}} for name in ("original", "oracle", "unlearned")}
    rows: list[dict[str, Any]] = []
    for variant in variants:
        if variant in skipped:
            rows.append({"variant": variant, "skipped": skipped[variant]})
            continue
        for eps in epsilons:
            if not math.isfinite(eps):
                rows.append(_row(variant, eps, [refs["unlearned"]], [refs["oracle"]], refs, None, auc_tol,
                                 utility_tol))
                continue
            mine = [p for p in plan if p["variant"] == variant and p["epsilon"] == eps]
            cert = [_summary(ms[f"certified:{p['tag']}"]) for p in mine]
            noised = [_summary(ms[f"noised_oracle:{p['tag']}"]) for p in mine]
            rows.append(_row(variant, eps, cert, noised, refs, mine[0]["certification"], auc_tol, utility_tol))
    return {"rows": rows, "references": refs, "delta": delta, "draws": draws, "auc_tol": auc_tol,
            "utility_tol": utility_tol, "forget_rows": len(data.forget), "holdout_rows": len(data.holdout or []),
            "reached_at": reached_at(rows)}


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"best_auc": _best_auc(m), **{f"auc_{a}": m.get(f"mia_auc_{a}") for a in ATTACKS},
            **{k: m.get(k) for k in UTILITY_KEYS}}


def _row(variant: str, eps: float, cert: list[dict], noised: list[dict], refs: dict, certification: dict | None,
         auc_tol: float, utility_tol: float) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": variant, "epsilon": eps}
    if certification is not None:
        row.update({k: certification.get(k) for k in ("guarantee", "bound", "sigma", "sigma_perp", "noise_norm",
                                                        "mode", "bound_source", "bound_parallel",
                                                        "bound_perpendicular")})
    for key in cert[0]:
        row[f"{key}_certified"] = _mean([c[key] for c in cert])
        row[f"{key}_noised_oracle"] = _mean([c[key] for c in noised])
    gap = [abs(c["best_auc"] - o["best_auc"]) for c, o in zip(cert, noised)
           if c["best_auc"] is not None and o["best_auc"] is not None]
    row["auc_gap"] = _mean(gap)
    ref_u = refs["oracle"].get("model_utility")
    u = row.get("model_utility_certified")
    row["utility_vs_oracle"] = u / ref_u if (u is not None and ref_u) else None
    row["meets_auc"] = row["auc_gap"] is not None and row["auc_gap"] <= auc_tol
    row["meets_utility"] = row["utility_vs_oracle"] is not None and row["utility_vs_oracle"] >= 1 - utility_tol
    row["meets_target"] = bool(row["meets_auc"] and row["meets_utility"])
    return row


def reached_at(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Per variant, the smallest finite epsilon whose row meets the target (None: none does)."""
    out: dict[str, float | None] = {}
    for r in rows:
        if "epsilon" not in r:
            out.setdefault(r["variant"], None)
            continue
        out.setdefault(r["variant"], None)
        if r["meets_target"] and math.isfinite(r["epsilon"]):
            cur = out[r["variant"]]
            out[r["variant"]] = r["epsilon"] if cur is None else min(cur, r["epsilon"])
    return out
