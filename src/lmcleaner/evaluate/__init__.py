"""Evaluation: forget / retain metrics, membership inference, fidelity to the
exact-retrain oracle, reports and plots (DESIGN §4).

Entry points: :func:`evaluate_models` (several models, ``eval.json`` +
``summary.json``), :class:`EvalData` (the splits), :func:`write_report`
(benchmark table + plots), and the ``lmcleaner eval`` subcommand in
:mod:`lmcleaner.evaluate.cli`.
"""

# train.loss first: lmcleaner.data and lmcleaner.train import each other, and
# this order initialises them without a partially-initialised module.
from ..train import loss as _loss  # noqa: F401
from .data import EvalData, EvalDataError, SPLITS, TRUTH_RATIO_BASE
from .fidelity import ParameterMismatchError, kl_to_oracle, param_distance, relative_param_error
from .generation import generate_answers, greedy_generate, left_pad, rouge_l_recall, stop_token_ids
from .io import to_jsonable, write_json_atomic
from .metrics import (
    answer_probability, exact_memorization, extraction_strength, forget_quality, model_utility,
    normalised_probability, truth_ratio, truth_ratio_forget_score, truth_ratio_retain_score,
)
from .mia import ATTACKS, auc, membership_scores, min_k_plus_plus_score, min_k_score, privleak, zlib_length
from .report import REPORT_COLUMNS, format_table, plot_error_vs_cost, plot_error_vs_k, plot_training_loss, write_report
from .runner import (
    DEFINITIONS, METRIC_KEYS, EvalSettings, ModelLoadError, evaluate_model, evaluate_models, evaluate_split,
    load_eval_tokenizer, load_model, summarize_model, write_results,
)
from .scoring import TokenStats, encode_pairs, score_answers, score_items, token_stats_from_logits

__all__ = [
    "EvalData", "EvalDataError", "SPLITS", "TRUTH_RATIO_BASE",
    "ParameterMismatchError", "kl_to_oracle", "param_distance", "relative_param_error",
    "generate_answers", "greedy_generate", "left_pad", "rouge_l_recall", "stop_token_ids",
    "to_jsonable", "write_json_atomic",
    "answer_probability", "exact_memorization", "extraction_strength", "forget_quality", "model_utility",
    "normalised_probability", "truth_ratio", "truth_ratio_forget_score", "truth_ratio_retain_score",
    "ATTACKS", "auc", "membership_scores", "min_k_plus_plus_score", "min_k_score", "privleak", "zlib_length",
    "REPORT_COLUMNS", "format_table", "plot_error_vs_cost", "plot_error_vs_k", "plot_training_loss", "write_report",
    "DEFINITIONS", "METRIC_KEYS", "EvalSettings", "ModelLoadError", "evaluate_model", "evaluate_models",
    "evaluate_split", "load_eval_tokenizer", "load_model", "summarize_model", "write_results",
    "TokenStats", "encode_pairs", "score_answers", "score_items", "token_stats_from_logits",
]
