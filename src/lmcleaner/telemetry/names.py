"""Logger names used by every part of lmcleaner, and their getters.

All loggers live under one prefix, ``lmcleaner``, so a single ``loggers:``
entry in the YAML can route or silence the whole library, and so the names do
not collide with the user's own loggers (``training`` alone is too generic for
a library that users embed in their own scripts).

Hierarchy (the dot means "propagates to" unless the YAML says
``propagate: false``)::

    lmcleaner                  human messages: console + text log file; TensorBoard
    lmcleaner.training         per-step training metrics      -> training.csv
    lmcleaner.model            model-related messages
    lmcleaner.model.outputs    generated answers              -> model_outputs.csv
    lmcleaner.reward           reward statistics              -> rewards.csv
    lmcleaner.system           memory / CPU / GPU usage       -> system.csv
    lmcleaner.metrics          evaluation and other metrics   -> metrics.csv
"""

from __future__ import annotations

import logging

ROOT_LOGGER = "lmcleaner"
TRAINING_LOGGER = f"{ROOT_LOGGER}.training"
MODEL_LOGGER = f"{ROOT_LOGGER}.model"
MODEL_OUTPUTS_LOGGER = f"{MODEL_LOGGER}.outputs"
REWARD_LOGGER = f"{ROOT_LOGGER}.reward"
SYSTEM_LOGGER = f"{ROOT_LOGGER}.system"
METRICS_LOGGER = f"{ROOT_LOGGER}.metrics"


def get_training_logger() -> logging.Logger:
    """Logger for per-step training metrics and training progress messages."""
    return logging.getLogger(TRAINING_LOGGER)


def get_model_logger() -> logging.Logger:
    """Logger for model-related messages (loading, generation settings, ...)."""
    return logging.getLogger(MODEL_LOGGER)


def get_reward_logger() -> logging.Logger:
    """Logger for reward-function statistics (RL fine-tuning, GRPO)."""
    return logging.getLogger(REWARD_LOGGER)


def get_system_logger() -> logging.Logger:
    """Logger for resource usage (memory, CPU, GPU) and environment messages."""
    return logging.getLogger(SYSTEM_LOGGER)


def get_metrics_logger() -> logging.Logger:
    """Logger for evaluation results and any other metric not tied to training steps."""
    return logging.getLogger(METRICS_LOGGER)


def short_name(logger_name: str) -> str:
    """``lmcleaner.training`` -> ``training``: the prefix used for TensorBoard tags."""
    prefix = ROOT_LOGGER + "."
    if logger_name.startswith(prefix):
        return logger_name[len(prefix):]
    return logger_name
