"""Evaluate several models (original, unlearned ones, the exact-retrain oracle)
on the same data and summarise every metric of DESIGN §4.

Why one entry point for all models: forget quality, privleak, the loss gap and
the KL / parameter fidelity numbers are all *relative to the oracle*, so the
oracle is evaluated first and kept loaded while each other model is loaded,
evaluated and released in turn (at most two models in memory).

Outputs:

- ``eval.json``: per model, per split, per sample values (in row order, with
  the rows' ids) — what a statistical test or a plot needs;
- ``summary.json``: per model, every aggregate metric; a metric that cannot
  be computed is ``null`` and ``reasons[metric]`` says why (split not
  provided, field missing, no oracle, ...).
Both are written atomically.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..data import embedded_tokenizer
from ..telemetry.progress import progress_bar
from . import metrics as M
from .conventions import get_convention
from .data import SPLITS, TRUTH_RATIO_BASE, EvalData, missing_field, perturbed_list, prompt_of
from .fidelity import kl_to_oracle, param_distance
from .generation import generate_answers, rouge_l_recall
from .io import write_json_atomic
from .mia import ATTACKS, auc, membership_scores, privleak
from .scoring import encode_pairs, pad_id, score_items

log = logging.getLogger("lmcleaner.evaluate")

ModelLike = "str | os.PathLike | torch.nn.Module"
PRIMARY_ATTACK = "min_k"  # MUSE computes PrivLeak with Min-K% Prob
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFINITIONS = {
    "prob": "exp(-mean answer-token NLL) (TOFU Prob.); real_authors/world_facts: P(a)/(P(a)+sum_j P(wrong_j)), "
            "length-normalised",
    "loss": "mean answer-token NLL (training loss mask)",
    "rougeL": "ROUGE-L recall of the greedy answer against the answer (rouge_score, stemmer)",
    "truth_ratio": "TR = P_pert / P_base, P = exp(-mean token NLL) (length-normalised), P_pert = exp(-mean_j "
                   "NLL_j) (geometric mean over perturbed answers), base = paraphrased answer (the answer on "
                   "real_authors/world_facts); forget: mean(min(TR,1/TR)), other splits: mean(max(0,1-TR))",
    "exact_memorization": "fraction of answer tokens equal to the teacher-forced argmax",
    "extraction_strength": "1 - k_min/n, k_min = shortest true prefix after which every answer token is the argmax",
    "forget_quality": "KS-test p-value between forget truth ratios of the model and of the oracle",
    "model_utility": "harmonic mean of retain (+ real_authors, world_facts when given) prob, rougeL, truth_ratio",
    "mia_auc": f"AUC forget (members) vs holdout, {PRIMARY_ATTACK} attack; mia_auc_<attack> for each attack",
    "privleak": "MUSE PrivLeak (%) = ((1-AUC_model) - (1-AUC_oracle)) / (1-AUC_oracle) * 100",
    "forget_loss_gap": "forget_loss(model) - forget_loss(oracle)",
    "retain_loss_gap": "retain_loss(model) - retain_loss(oracle)",
    "kl_forget": "mean over supervised forget answer positions of KL(oracle || model)",
    "kl_retain": "mean over supervised retain answer positions of KL(oracle || model)",
    "rel_param_error": "||theta - theta_oracle|| / ||theta_original - theta_oracle|| (float64)",
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line naming it."""


@dataclass
class EvalSettings:
    """Knobs shared by every model's evaluation."""

    max_new_tokens: int = 200
    batch_size: int = 8
    max_length: int = 512
    min_k: float = 0.4
    progress: bool = True
    convention: str = "lmcleaner"  # lmcleaner | open-unlearning (see evaluate.conventions)

    @property
    def generate(self) -> bool:
        return self.max_new_tokens > 0


# --------------------------------------------------------------------------- loading
def load_model(path: str | os.PathLike, name: str | None = None, dtype: str = "float32",
               device: str | torch.device | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` in eval mode; one-line error naming the model.

    A directory that ships Python code (``auto_map``) is refused unless ``trust_remote_code``."""
    from transformers import AutoModelForCausalLM

    from ..config.received import guard_remote_code

    label = f"model '{name}'" if name else "model"
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"{label}: directory not found: {p}")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{label}: {p} has no config.json (not a Hugging Face model directory)")
    kwargs: dict[str, Any] = {"trust_remote_code": guard_remote_code(p, trust_remote_code, key=f"--model {name or p}")}
    if dtype and dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unknown dtype '{dtype}': choose one of {list(_DTYPES) + ['auto']}")
        kwargs["dtype"] = _DTYPES[dtype]
    else:
        kwargs["dtype"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    except Exception as err:  # noqa: BLE001 - turned into one line naming the model
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"{label}: cannot load {p}: {first}") from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def load_eval_tokenizer(path: str | os.PathLike | None, trust_remote_code: bool = False):
    """The tokenizer saved in a model directory, or the embedded one when the
    directory has none (models trained on the embedded data)."""
    if path is None or not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        return embedded_tokenizer()
    from transformers import AutoTokenizer

    from ..config.received import guard_remote_code

    trust = guard_remote_code(path, trust_remote_code, key=f"tokenizer {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {first}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- one model
def evaluate_split(model: torch.nn.Module, tokenizer, split: str, rows: list[dict], settings: EvalSettings,
                   oracle: torch.nn.Module | None = None, tag: str = "") -> tuple[dict[str, list], dict[str, str]]:
    """Per-sample values of one model on one split, and reasons for skipped metrics."""
    s = settings
    conv = get_convention(s.convention)
    prefix = f"{tag}/{split}" if tag else split
    reasons: dict[str, str] = {}
    questions = [prompt_of(r) for r in rows]
    answers = [str(r["answer"]) for r in rows]
    pid = pad_id(tokenizer)
    items = encode_pairs(tokenizer, questions, answers, s.max_length)
    stats = score_items(model, items, pid, s.batch_size, s.progress, f"{prefix}: answers")
    out: dict[str, list] = {
        "num_answer_tokens": [st.n for st in stats],
        "loss": [st.loss for st in stats],
        "prob": [st.prob for st in stats],
        "exact_memorization": [M.exact_memorization(st.correct, conv) for st in stats],
        "extraction_strength": [M.extraction_strength(st.correct, conv) for st in stats],
    }
    if split in ("forget", "holdout"):
        texts = answers
        if conv.zlib_decoded_labels:  # open-unlearning compresses the decoded supervised tokens
            texts = [tokenizer.decode([t for t in it["labels"] if t != -100], skip_special_tokens=True)
                     for it in items]
        scores = [membership_scores(st, a, s.min_k, conv) for st, a in zip(stats, texts)]
        for attack in ATTACKS:
            out[f"mia_{attack}"] = [sc[attack] for sc in scores]

    if split != "holdout":
        if s.generate:
            gens = generate_answers(model, tokenizer, questions, s.max_new_tokens, s.batch_size, s.progress,
                                    f"{prefix}: generating")
            out["generation"] = gens
            out["rougeL_recall"] = rouge_l_recall(answers, gens)
        else:
            reasons["rougeL"] = "generation disabled (max_new_tokens=0)"
        base_key = TRUTH_RATIO_BASE[split]
        bad = missing_field(rows, base_key)
        bad_pert = missing_field(rows, "perturbed_answer")
        if bad is not None:
            reasons["truth_ratio"] = f"split '{split}' row {bad} has no '{base_key}'"
        elif bad_pert is not None:
            reasons["truth_ratio"] = f"split '{split}' row {bad_pert} has no 'perturbed_answer'"
        else:
            if base_key == "answer":
                base_losses = out["loss"]
            else:
                base_items = encode_pairs(tokenizer, questions, [str(r[base_key]) for r in rows], s.max_length)
                base_losses = [st.loss for st in score_items(model, base_items, pid, s.batch_size, s.progress,
                                                             f"{prefix}: {base_key}")]
            pert = [perturbed_list(r) for r in rows]
            flat_q = [q for q, ps in zip(questions, pert) for _ in ps]
            flat_a = [a for ps in pert for a in ps]
            flat = score_items(model, encode_pairs(tokenizer, flat_q, flat_a, s.max_length), pid, s.batch_size,
                               s.progress, f"{prefix}: perturbed")
            pert_losses, k = [], 0
            for ps in pert:
                pert_losses.append([st.loss for st in flat[k:k + len(ps)]])
                k += len(ps)
            out["base_loss"] = base_losses
            out["perturbed_loss"] = pert_losses
            out["truth_ratio"] = [M.truth_ratio(b, p, conv.eps) for b, p in zip(base_losses, pert_losses)]
            if split in ("real_authors", "world_facts"):
                out["normalised_prob"] = [M.normalised_probability(l, p, conv.eps)
                                          for l, p in zip(out["loss"], pert_losses)]
    if oracle is not None and split in ("forget", "retain"):
        if oracle is model:
            out["kl_sum"], out["kl_count"] = [0.0] * len(items), [st.n for st in stats]
        else:
            out["kl_sum"], out["kl_count"] = kl_to_oracle(model, oracle, items, pid, s.batch_size, s.progress,
                                                          f"{prefix}: KL")
    return out, reasons


def evaluate_model(model: torch.nn.Module, tokenizer, data: EvalData, settings: EvalSettings | None = None,
                   oracle: torch.nn.Module | None = None, tag: str = "",
                   bar=None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per-split per-sample values for one model (``{split: {metric: [...]}}``) and per-split reasons.
    ``bar``: a progress display advanced once per split."""
    settings = settings or EvalSettings()
    per_split, reasons = {}, {}
    for split, rows in data.splits().items():
        if bar is not None:
            bar.set_postfix_str(f"{tag or 'model'}/{split}")
        values, why = evaluate_split(model, tokenizer, split, rows, settings, oracle, tag)
        per_split[split] = {"ids": data.row_ids(split), **values}
        reasons[split] = why
        if bar is not None:
            bar.update(1)
    return per_split, reasons


# --------------------------------------------------------------------------- summary
def _metric_keys() -> list[str]:
    keys = []
    for split in SPLITS:
        keys += [f"{split}_loss", f"{split}_prob"]
        if split != "holdout":
            keys += [f"{split}_rougeL", f"{split}_truth_ratio"]
        if split in ("forget", "retain", "holdout"):
            keys += [f"{split}_exact_memorization", f"{split}_extraction_strength"]
    keys += ["forget_quality", "model_utility", "mia_auc", *[f"mia_auc_{a}" for a in ATTACKS],
             "privleak", *[f"privleak_{a}" for a in ATTACKS], "forget_loss_gap", "retain_loss_gap", "kl_forget",
             "kl_retain", "rel_param_error", "param_distance_to_oracle", "eval_seconds"]
    return keys


METRIC_KEYS = _metric_keys()


def _split_aggregates(split: str, values: dict[str, list], why: dict[str, str],
                      eps: float = 0.0) -> tuple[dict, dict]:
    agg: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    agg[f"{split}_loss"] = M.nanmean(values["loss"])
    prob_key = "normalised_prob" if split in ("real_authors", "world_facts") else "prob"
    if prob_key in values:
        agg[f"{split}_prob"] = M.nanmean(values[prob_key])
    else:
        reasons[f"{split}_prob"] = why.get("truth_ratio", "needs perturbed answers")
    if split in ("forget", "retain", "holdout"):
        agg[f"{split}_exact_memorization"] = M.nanmean(values["exact_memorization"])
        agg[f"{split}_extraction_strength"] = M.nanmean(values["extraction_strength"])
    if split != "holdout":
        if "rougeL_recall" in values:
            agg[f"{split}_rougeL"] = M.nanmean(values["rougeL_recall"])
        else:
            reasons[f"{split}_rougeL"] = why.get("rougeL", "not computed")
        if "truth_ratio" in values:
            agg[f"{split}_truth_ratio"] = (M.truth_ratio_forget_score(values["truth_ratio"], eps) if split == "forget"
                                           else M.truth_ratio_retain_score(values["truth_ratio"]))
        else:
            reasons[f"{split}_truth_ratio"] = why.get("truth_ratio", "not computed")
    return agg, reasons


def summarize_model(name: str, per_split: dict[str, dict], split_reasons: dict[str, dict],
                    oracle_split: dict[str, dict] | None, oracle_name: str | None,
                    convention: str | None = None) -> dict[str, Any]:
    """Aggregate metrics of one model; ``reasons`` for every metric left null."""
    eps = get_convention(convention).eps
    res: dict[str, Any] = {k: None for k in METRIC_KEYS}
    reasons: dict[str, str] = {}
    for split in SPLITS:
        if split not in per_split:
            for key in METRIC_KEYS:
                if key.startswith(split + "_"):
                    reasons[key] = f"split '{split}' not provided"
            continue
        agg, why = _split_aggregates(split, per_split[split], split_reasons.get(split, {}), eps)
        res.update(agg)
        reasons.update(why)

    no_oracle = "no oracle model given (oracle=...)" if oracle_name is None else None
    # forget quality
    if no_oracle:
        reasons["forget_quality"] = no_oracle
    elif "truth_ratio" not in per_split["forget"] or "truth_ratio" not in (oracle_split or {}).get("forget", {}):
        reasons["forget_quality"] = "needs forget truth ratios: " + split_reasons.get("forget", {}).get(
            "truth_ratio", "not computed")
    else:
        res["forget_quality"] = M.forget_quality(per_split["forget"]["truth_ratio"],
                                                 oracle_split["forget"]["truth_ratio"])
    # model utility
    components = ["retain_prob", "retain_rougeL", "retain_truth_ratio"]
    for split in ("real_authors", "world_facts"):
        if split in per_split:
            components += [f"{split}_prob", f"{split}_rougeL", f"{split}_truth_ratio"]
    missing = [c for c in components if res.get(c) is None or not math.isfinite(res[c])]
    if "retain" not in per_split:
        reasons["model_utility"] = "needs the retain split"
    elif missing:
        reasons["model_utility"] = "missing components: " + ", ".join(
            f"{c} ({reasons.get(c, 'no value')})" for c in missing)
    else:
        res["model_utility"] = M.model_utility([res[c] for c in components])
    # membership inference
    for attack in ATTACKS:
        key = f"mia_auc_{attack}"
        if "holdout" not in per_split:
            reasons[key] = reasons[f"privleak_{attack}"] = "needs the holdout split (non-members)"
            continue
        res[key] = auc(per_split["forget"][f"mia_{attack}"], per_split["holdout"][f"mia_{attack}"])
        pkey = f"privleak_{attack}"
        if no_oracle:
            reasons[pkey] = no_oracle
        elif oracle_split is None or "holdout" not in oracle_split:
            reasons[pkey] = "oracle has no holdout scores"
        else:
            ref = auc(oracle_split["forget"][f"mia_{attack}"], oracle_split["holdout"][f"mia_{attack}"])
            res[pkey] = privleak(res[key], ref, eps)
            if res[pkey] is None or not math.isfinite(res[pkey]):
                reasons[pkey] = f"oracle AUC is {ref:.3f}: privleak undefined (divides by 1 - AUC_oracle)"
    res["mia_auc"] = res[f"mia_auc_{PRIMARY_ATTACK}"]
    res["privleak"] = res[f"privleak_{PRIMARY_ATTACK}"]
    for key, src in (("mia_auc", f"mia_auc_{PRIMARY_ATTACK}"), ("privleak", f"privleak_{PRIMARY_ATTACK}")):
        if src in reasons:
            reasons[key] = reasons[src]
    # fidelity to the oracle
    if no_oracle:
        for key in ("forget_loss_gap", "retain_loss_gap", "kl_forget", "kl_retain", "param_distance_to_oracle",
                    "rel_param_error"):
            reasons[key] = no_oracle
    else:
        res["forget_loss_gap"] = M.nanmean(per_split["forget"]["loss"]) - M.nanmean(oracle_split["forget"]["loss"])
        if "retain" in per_split:
            res["retain_loss_gap"] = M.nanmean(per_split["retain"]["loss"]) - M.nanmean(oracle_split["retain"]["loss"])
        else:
            reasons["retain_loss_gap"] = "split 'retain' not provided"
        for split in ("forget", "retain"):
            key = f"kl_{split}"
            if split not in per_split:
                reasons[key] = f"split '{split}' not provided"
                continue
            if "kl_sum" not in per_split[split]:
                reasons[key] = "KL not computed (model evaluated without the oracle)"
                continue
            sums = np.asarray(per_split[split]["kl_sum"], dtype=np.float64)
            counts = np.asarray(per_split[split]["kl_count"], dtype=np.float64)
            ok = np.isfinite(sums) & (counts > 0)
            res[key] = float(sums[ok].sum() / counts[ok].sum()) if ok.any() else None
            if res[key] is None:
                reasons[key] = "no supervised answer positions"
    # NaN -> null with a reason
    for key, value in list(res.items()):
        if isinstance(value, float) and not math.isfinite(value):
            res[key] = None
            reasons.setdefault(key, "undefined (NaN: no valid samples)")
    res["reasons"] = {k: reasons[k] for k in METRIC_KEYS if k in reasons and res.get(k) is None}
    return res


# --------------------------------------------------------------------------- several models
def evaluate_models(models: Mapping[str, Any], data: EvalData, oracle: str | None = None,
                    original: str | None = None, tokenizer=None, out_dir: str | os.PathLike | None = None,
                    max_new_tokens: int = 200, batch_size: int = 8, max_length: int = 512, min_k: float = 0.4,
                    dtype: str = "float32", device: str | None = None, progress: bool = True,
                    trust_remote_code: bool = False,
                    convention: str = "lmcleaner") -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate ``models`` (name -> model directory or ``nn.Module``) on ``data``.

    ``oracle`` / ``original`` name entries of ``models``: the exact-retrain
    model (reference of forget quality, privleak, KL, loss gap, parameter
    error) and the model before unlearning (denominator of the relative
    parameter error). ``convention``: ``lmcleaner`` or ``open-unlearning``
    (:mod:`lmcleaner.evaluate.conventions`). Returns ``(per_sample, summary)`` and,
    with ``out_dir``, writes there ``eval.json``, ``summary.json``, the plots
    ``forget_vs_utility.png`` and ``mia_auc.png``, and open-unlearning's
    ``open_unlearning/<model>/TOFU_{EVAL,SUMMARY}.json``.
    """
    if not models:
        raise ValueError("no models to evaluate")
    for role, name in (("oracle", oracle), ("original", original)):
        if name is not None and name not in models:
            raise ValueError(f"{role} '{name}' is not one of the models: {sorted(models)}")
    settings = EvalSettings(max_new_tokens, batch_size, max_length, min_k, progress,
                            get_convention(convention).name)
    if tokenizer is None:
        candidates = ([oracle] if oracle else []) + list(models)
        paths = [models[n] for n in candidates if not isinstance(models[n], torch.nn.Module)]
        tokenizer = load_eval_tokenizer(paths[0] if paths else None, trust_remote_code)

    order = [n for n in (oracle, original) if n is not None]
    order += [n for n in models if n not in order]
    per_model: dict[str, dict] = {}
    split_reasons: dict[str, dict] = {}
    distances: dict[str, float] = {}
    seconds: dict[str, float] = {}
    oracle_model = None
    bar = progress_bar(total=len(order) * len(data.splits()), desc="eval", enabled=progress, unit="split")

    def get(name: str) -> torch.nn.Module:
        value = models[name]
        if isinstance(value, torch.nn.Module):
            return value.eval()
        return load_model(value, name, dtype, device, trust_remote_code)

    try:
        for name in order:
            model = oracle_model if name == oracle and oracle_model is not None else get(name)
            if name == oracle:
                oracle_model = model
            log.info("evaluating %s", name)
            t0 = time.perf_counter()
            per_model[name], split_reasons[name] = evaluate_model(model, tokenizer, data, settings, oracle_model, name,
                                                                  bar)
            if oracle_model is not None:
                distances[name] = 0.0 if model is oracle_model else param_distance(model, oracle_model)
            seconds[name] = time.perf_counter() - t0
            if model is not oracle_model and not isinstance(models[name], torch.nn.Module):
                del model
                gc.collect()
    finally:
        bar.close()
        oracle_model = None
        gc.collect()

    summary_models: dict[str, dict] = {}
    for name in models:
        res = summarize_model(name, per_model[name], split_reasons[name],
                              per_model.get(oracle) if oracle else None, oracle, settings.convention)
        res["eval_seconds"] = seconds[name]
        if oracle is not None:
            res["param_distance_to_oracle"] = distances[name]
            if original is None:
                res["reasons"]["rel_param_error"] = "no original model given (original=...)"
            elif distances[original] > 0:
                res["rel_param_error"] = distances[name] / distances[original]
            else:
                res["reasons"]["rel_param_error"] = "original and oracle have identical parameters"
        summary_models[name] = res

    per_sample = {
        "data": data.description,
        "splits": {split: {"ids": data.row_ids(split), "question": [r["question"] for r in rows]}
                   for split, rows in data.splits().items()},
        "models": per_model,
    }
    summary = {
        "oracle": oracle, "original": original, "data": data.description, "convention": settings.convention,
        "splits": {split: len(rows) for split, rows in data.splits().items()},
        "settings": asdict(settings), "definitions": DEFINITIONS, "models": summary_models,
    }
    if out_dir is not None:
        write_results(out_dir, per_sample, summary)
    return per_sample, summary


def write_results(out_dir: str | os.PathLike, per_sample: dict, summary: dict) -> dict[str, Path]:
    """Write ``eval.json``, ``summary.json`` (atomically), the per-model plots and the
    open-unlearning result files; returns their paths."""
    from .open_unlearning import write_open_unlearning
    from .report import write_model_plots

    out = Path(out_dir)
    paths = {"eval": write_json_atomic(out / "eval.json", per_sample, indent=None),
             "summary": write_json_atomic(out / "summary.json", summary)}
    paths.update(write_model_plots([{"name": n, **m} for n, m in summary["models"].items()], out))
    paths.update({f"open_unlearning/{n}": p for n, p in
                  write_open_unlearning(out, per_sample["models"], summary).items()})
    return paths
