"""Our evaluation results under open-unlearning's TOFU key names.

Why: open-unlearning (locuslab/open-unlearning) writes, per evaluated model,
``TOFU_EVAL.json`` (per metric ``{"agg_value": x, "value_by_index": {row:
{...}}}``) and ``TOFU_SUMMARY.json`` (``{metric: agg_value}``); its
aggregation scripts and leaderboards read those names, and its
``forget_quality`` / ``privleak`` take a retain model's ``TOFU_EVAL.json`` as
``retain_logs_path``. ``lmcleaner eval`` writes the same files for every
model under ``<out>/open_unlearning/<model>/``, so the oracle's file serves as
their reference log. Values follow the convention the evaluation ran with
(``--convention open-unlearning`` for numbers comparable with their tables);
the convention is recorded under ``"lmcleaner"``.

Key mapping (ours -> theirs): ``forget_prob`` -> ``forget_Q_A_Prob``,
``forget_rougeL`` -> ``forget_Q_A_ROUGE``, ``forget_truth_ratio`` ->
``forget_Truth_Ratio`` (and its pre-compute ``forget_truth_ratio``), paraphrased /
perturbed answer probabilities -> ``forget_Q_A_PARA_Prob`` /
``forget_Q_A_PERT_Prob``, the same for ``retain_``, ``real_authors`` -> ``ra_``
(``ra_Q_A_Prob_normalised``), ``world_facts`` -> ``wf_``; ``forget_quality``,
``model_utility``, ``privleak``; forget-set ``extraction_strength`` and
``exact_memorization``; ``mia_auc_<attack>`` -> ``mia_loss``, ``mia_zlib``,
``mia_min_k``, ``mia_min_k_plus_plus`` (AUC, their label convention gives the same number).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .io import write_json_atomic

EVAL_FILE, SUMMARY_FILE = "TOFU_EVAL.json", "TOFU_SUMMARY.json"
PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
ATTACK_KEYS = {"loss": "mia_loss", "zlib": "mia_zlib", "min_k": "mia_min_k", "min_k_plus_plus": "mia_min_k_plus_plus"}


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def _by_index(ids: list, **columns: list) -> dict[str, dict]:
    return {str(i): {k: v[n] for k, v in columns.items()} for n, i in enumerate(ids)}


def _probs(losses: list) -> list:
    return [math.exp(-l) if _num(l) is not None else None for l in losses]


def _negated(xs: list) -> list:
    """open-unlearning's attack scores are non-membership scores (ours negated); the AUC is the same number."""
    return [-x if _num(x) is not None else None for x in xs]


def tofu_eval(per_split: dict[str, dict], summary: dict[str, Any]) -> dict[str, dict]:
    """``TOFU_EVAL.json`` content for one model."""
    out: dict[str, dict] = {}

    def put(key: str, agg: Any, **by_index: Any) -> None:
        entry: dict[str, Any] = {"agg_value": _num(agg)}
        entry.update(by_index)
        out[key] = entry

    for split, p in PREFIX.items():
        v = per_split.get(split)
        if v is None:
            continue
        ids = v["ids"]
        prob_key = "Q_A_Prob_normalised" if split in ("real_authors", "world_facts") else "Q_A_Prob"
        put(f"{p}_{prob_key}", summary.get(f"{split}_prob"),
            value_by_index=_by_index(ids, prob=v.get("normalised_prob", v["prob"]), avg_loss=v["loss"]))
        if split in ("real_authors", "world_facts"):
            probs = _probs(v["loss"])
            put(f"{p}_Q_A_Prob", sum(x for x in probs if x is not None) / max(1, len(probs)),
                value_by_index=_by_index(ids, prob=probs, avg_loss=v["loss"]))
        if "rougeL_recall" in v:
            put(f"{p}_Q_A_ROUGE", summary.get(f"{split}_rougeL"),
                value_by_index=_by_index(ids, rougeL_recall=v["rougeL_recall"],
                                         gen=v.get("generation", [None] * len(ids))))
        if "truth_ratio" in v:
            tr = _by_index(ids, score=v["truth_ratio"])
            put(f"{p}_Truth_Ratio", summary.get(f"{split}_truth_ratio"), value_by_index=tr)
            if split == "forget":  # the pre-compute name forget_quality reads from a retain model's log
                put("forget_truth_ratio", summary.get("forget_truth_ratio"), value_by_index=tr)
            if split in ("forget", "retain"):
                put(f"{p}_Q_A_PARA_Prob", None, value_by_index=_by_index(
                    ids, prob=_probs(v["base_loss"]), avg_loss=v["base_loss"]))
                put(f"{p}_Q_A_PERT_Prob", None, value_by_index=_by_index(
                    ids, prob=[_probs(x) for x in v["perturbed_loss"]], avg_loss=v["perturbed_loss"]))
    forget, holdout = per_split.get("forget"), per_split.get("holdout")
    if forget is not None:
        put("extraction_strength", summary.get("forget_extraction_strength"),
            value_by_index=_by_index(forget["ids"], score=forget["extraction_strength"]))
        put("exact_memorization", summary.get("forget_exact_memorization"),
            value_by_index=_by_index(forget["ids"], score=forget["exact_memorization"]))
    if forget is not None and holdout is not None:
        for attack, key in ATTACK_KEYS.items():
            col = f"mia_{attack}"
            if col not in forget:
                continue
            auc = _num(summary.get(f"mia_auc_{attack}"))
            out[key] = {"agg_value": auc, "auc": auc,
                        "forget": {"value_by_index": _by_index(forget["ids"], score=_negated(forget[col]))},
                        "holdout": {"value_by_index": _by_index(holdout["ids"], score=_negated(holdout[col]))}}
    for key in ("forget_quality", "model_utility", "privleak"):
        put(key, summary.get(key))
    return out


def tofu_summary(tofu: dict[str, dict]) -> dict[str, float]:
    """``TOFU_SUMMARY.json``: every metric with a value."""
    return {k: v["agg_value"] for k, v in tofu.items() if v.get("agg_value") is not None}


def write_open_unlearning(out_dir: str | Path, per_model: dict[str, dict],
                          summary: dict[str, Any]) -> dict[str, Path]:
    """Write ``<out_dir>/open_unlearning/<model>/{TOFU_EVAL,TOFU_SUMMARY}.json``; returns the summary paths."""
    root = Path(out_dir) / "open_unlearning"
    note = {"convention": summary.get("settings", {}).get("convention"), "data": summary.get("data"),
            "oracle": summary.get("oracle")}
    paths = {}
    for name, per_split in per_model.items():
        tofu = tofu_eval(per_split, summary["models"][name])
        folder = root / re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)
        write_json_atomic(folder / EVAL_FILE, {**tofu, "lmcleaner": {**note, "model": name}})
        paths[name] = write_json_atomic(folder / SUMMARY_FILE, tofu_summary(tofu))
    return paths
