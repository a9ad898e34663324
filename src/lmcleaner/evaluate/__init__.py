"""Evaluation: forget / retain metrics, membership inference, fidelity to the
exact-retrain oracle, reports and plots (DESIGN §4).

Entry points: :func:`evaluate_models` (several models, ``eval.json`` +
``summary.json``), :class:`EvalData` (the splits), :func:`write_report`
(benchmark table + plots), and the ``lmcleaner eval`` subcommand in
:mod:`lmcleaner.evaluate.cli`.
"""

# Exports resolve lazily (PEP 562): ``lmcleaner eval --help`` must not import torch, and
# lmcleaner.data / lmcleaner.train import each other, which eager imports here would entangle.
from ..lazy import lazy_exports

_EXPORTS = {
    "EvalData": "data", "EvalDataError": "data", "SPLITS": "data", "TRUTH_RATIO_BASE": "data",
    "ParameterMismatchError": "fidelity", "kl_to_oracle": "fidelity", "param_distance": "fidelity",
    "relative_param_error": "fidelity", "generate_answers": "generation", "greedy_generate": "generation",
    "left_pad": "generation", "rouge_l_recall": "generation", "stop_token_ids": "generation", "to_jsonable": "io",
    "write_json_atomic": "io", "answer_probability": "metrics", "exact_memorization": "metrics",
    "extraction_strength": "metrics", "forget_quality": "metrics", "model_utility": "metrics",
    "normalised_probability": "metrics", "truth_ratio": "metrics", "truth_ratio_forget_score": "metrics",
    "truth_ratio_retain_score": "metrics", "ATTACKS": "mia", "auc": "mia", "membership_scores": "mia",
    "min_k_plus_plus_score": "mia", "min_k_score": "mia", "privleak": "mia", "zlib_length": "mia",
    "REPORT_COLUMNS": "report", "format_table": "report", "plot_error_vs_cost": "report",
    "plot_error_vs_k": "report", "plot_training_loss": "report", "write_report": "report", "DEFINITIONS": "runner",
    "METRIC_KEYS": "runner", "EvalSettings": "runner", "ModelLoadError": "runner", "evaluate_model": "runner",
    "evaluate_models": "runner", "evaluate_split": "runner", "load_eval_tokenizer": "runner",
    "load_model": "runner", "summarize_model": "runner", "write_results": "runner", "TokenStats": "scoring",
    "encode_pairs": "scoring", "score_answers": "scoring", "score_items": "scoring",
    "token_stats_from_logits": "scoring",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
