"""A minimal interface for "something that takes step metrics".

Parts of lmcleaner that report metrics accept any :class:`MetricLogger`, so
tests can pass a list-collecting fake and users can plug in their own sink
(W&B, MLflow) without touching the logging tree.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from .names import TRAINING_LOGGER
from .records import emit_metrics


@runtime_checkable
class MetricLogger(Protocol):
    """Anything with ``log_metrics(step, metrics)``."""

    def log_metrics(self, step: int | None, metrics: Mapping[str, Any]) -> None: ...


class LoggingMetricLogger:
    """A :class:`MetricLogger` that emits metric records on a named logger."""

    def __init__(self, logger_name: str = TRAINING_LOGGER) -> None:
        self.logger = logging.getLogger(logger_name)

    def log_metrics(self, step: int | None, metrics: Mapping[str, Any]) -> None:
        emit_metrics(self.logger, metrics, step=step)


class NullMetricLogger:
    """A :class:`MetricLogger` that does nothing (for code paths that opt out)."""

    def log_metrics(self, step: int | None, metrics: Mapping[str, Any]) -> None:
        return None
