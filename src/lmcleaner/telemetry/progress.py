"""Per-step training metrics and model outputs.

Both helpers only build a log record and hand it to the handlers, which queue
it for their writer threads; no file is touched on the caller's thread with
the default configuration. When telemetry is not initialised they are plain
logging calls that return after one ``isEnabledFor`` check unless the user
configured logging for ``lmcleaner.*`` themselves, so a training loop never
needs an ``if telemetry_enabled:`` branch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .names import MODEL_OUTPUTS_LOGGER, TRAINING_LOGGER
from .records import emit_metrics
from .session import current_settings

_training = logging.getLogger(TRAINING_LOGGER)
_outputs = logging.getLogger(MODEL_OUTPUTS_LOGGER)


def log_training_progress(step: int, metrics: Mapping[str, Any]) -> None:
    """Record one training step's metrics (``loss``, ``lr``, ...).

    Kept only when ``step % metrics.logging_frequency == 0``. Values may be
    Python numbers or 1-element tensors (converted on the writer thread).
    """
    settings = current_settings()
    if settings is not None and settings.logging_frequency > 1 and step % settings.logging_frequency:
        return
    emit_metrics(_training, metrics, step=step)


def log_model_output(
    question: str,
    true_answer: str,
    model_output: str,
    reasoning: str | None = None,
    answer: str | None = None,
    *,
    step: int | None = None,
) -> None:
    """Append one generated answer to the model-outputs CSV (``model_outputs.csv``).

    ``reasoning`` / ``answer`` are the parsed parts of ``model_output`` when
    the caller has them (e.g. chain-of-thought and final answer).
    """
    emit_metrics(
        _outputs,
        {
            "question": question,
            "true_answer": true_answer,
            "model_output": model_output,
            "reasoning": reasoning,
            "answer": answer,
        },
        step=step,
        message="model output",
    )
