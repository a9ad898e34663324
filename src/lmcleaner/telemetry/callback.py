"""``transformers.TrainerCallback`` that routes Trainer logs into the telemetry loggers.

* ``on_log`` -> ``lmcleaner.training`` (``training.csv``, TensorBoard
  ``training/*``), keeping every n-th call;
* ``on_evaluate`` -> ``lmcleaner.metrics`` (``metrics.csv``, TensorBoard
  ``metrics/*``), keeping every n-th evaluation;
* ``on_train_begin`` / ``on_train_end`` -> a message, and a flush at the end
  so the files are complete when ``trainer.train()`` returns.

The Trainer also passes evaluation results through ``on_log`` right before
``on_evaluate``; those ``eval_*`` keys are skipped in ``on_log`` so each
evaluation is recorded once, in ``metrics.csv``. Only the world-process-zero
rank logs, so multi-GPU runs do not write every row N times.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .names import METRICS_LOGGER, TRAINING_LOGGER
from .records import as_scalar, emit_metrics
from .session import current_settings, flush


def _numeric(logs: dict[str, Any] | None, skip_eval: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (logs or {}).items():
        if skip_eval and key.startswith("eval_"):
            continue
        scalar = as_scalar(value)
        if scalar is not None:
            out[key] = scalar
    return out


class TelemetryCallback(TrainerCallback):
    """Send ``Trainer`` logs and evaluation results to lmcleaner telemetry.

    Args:
        log_every_n: keep every n-th ``on_log`` call (``None``: the session's
            ``metrics.logging_frequency``, 1 when not initialised). Logging
            less often saves the per-row cost when ``logging_steps`` is 1.
        eval_every_n: keep every n-th ``on_evaluate`` call (``None``: the
            session's ``metrics.validation_frequency``).
    """

    def __init__(self, log_every_n: int | None = None, eval_every_n: int | None = None) -> None:
        for name, value in (("log_every_n", log_every_n), ("eval_every_n", eval_every_n)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.log_every_n = log_every_n
        self.eval_every_n = eval_every_n
        self._log_calls = 0
        self._eval_calls = 0
        self._training = logging.getLogger(TRAINING_LOGGER)
        self._metrics = logging.getLogger(METRICS_LOGGER)

    def _every(self, explicit: int | None, attr: str) -> int:
        if explicit is not None:
            return explicit
        settings = current_settings()
        return getattr(settings, attr) if settings is not None else 1

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._training.info("training started: max_steps=%s, output_dir=%s", state.max_steps, args.output_dir)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        metrics = _numeric(logs, skip_eval=True)
        if not metrics:
            return
        # The end-of-training summary (train_runtime, train_loss, ...) comes
        # once; it is always kept and does not count towards log_every_n.
        if not any(key.startswith("train_") for key in metrics):
            self._log_calls += 1
            every = self._every(self.log_every_n, "logging_frequency")
            if (self._log_calls - 1) % every:
                return
        emit_metrics(self._training, metrics, step=state.global_step)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        values = _numeric(metrics, skip_eval=False)
        if not values:
            return
        self._eval_calls += 1
        every = self._every(self.eval_every_n, "validation_frequency")
        if (self._eval_calls - 1) % every:
            return
        emit_metrics(self._metrics, values, step=state.global_step, message="evaluation")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._training.info("training finished at step %s", state.global_step)
        flush()
