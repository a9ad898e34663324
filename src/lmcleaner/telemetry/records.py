"""The metric-record convention shared by all handlers.

A *metric record* is an ordinary :class:`logging.LogRecord` that carries a
mapping of values in ``extra={"metrics": {...}}`` and optionally the training
step in ``extra={"step": n}``::

    logger.info("eval", extra={"metrics": {"eval_loss": 0.41}, "step": 120})

Why ride on ``extra`` instead of a separate metrics API: every part of the
library (and the user's own scripts) already has a logger; routing, levels,
``propagate`` and handler wiring then come from the single YAML file, and the
same record can reach the CSV file, TensorBoard and the text log.

Handlers treat records this way:

* :class:`~lmcleaner.telemetry.CSVHandler` writes one row per metric record
  and ignores plain messages;
* :class:`~lmcleaner.telemetry.TensorBoardHandler` writes numeric values as
  scalars, string values and plain messages as text;
* :class:`PlainMessagesFilter` keeps metric records off the console.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from typing import Any

METRICS_ATTR = "metrics"
STEP_ATTR = "step"


def metrics_of(record: logging.LogRecord) -> Mapping[str, Any] | None:
    """The record's metric mapping, or ``None`` for a plain message."""
    metrics = getattr(record, METRICS_ATTR, None)
    return metrics if isinstance(metrics, Mapping) else None


def step_of(record: logging.LogRecord) -> int | None:
    """The record's training step, or ``None`` when it has none."""
    step = getattr(record, STEP_ATTR, None)
    if step is None:
        return None
    try:
        return int(step)
    except (TypeError, ValueError):
        return None


def to_python_value(value: Any) -> Any:
    """Turn 1-element tensors / numpy scalars into Python numbers.

    Called on the writer thread, so a ``loss.detach()`` handed to the logger
    is only synchronised (``.item()``) off the training loop.
    """
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        numel = getattr(value, "numel", None)
        size = numel() if callable(numel) else getattr(value, "size", 1)
        if size == 1:
            try:
                return item()
            except Exception:  # a broken tensor must not kill the writer thread
                return str(value)
    return value


def as_scalar(value: Any) -> float | None:
    """The value as a float when it is a real number, otherwise ``None``."""
    value = to_python_value(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


class KeyValueText:
    """Lazily rendered ``key=value`` text for the message of a metric record.

    The text log shows metric records as ``step 12: loss=0.5 lr=0.0001``; the
    rendering happens only when (and where) a text handler formats the record,
    i.e. on its writer thread, not on the training loop.
    """

    __slots__ = ("_metrics",)

    def __init__(self, metrics: Mapping[str, Any]) -> None:
        self._metrics = metrics

    def __str__(self) -> str:
        parts = []
        for key, value in self._metrics.items():
            value = to_python_value(value)
            if isinstance(value, float) and math.isfinite(value):
                parts.append(f"{key}={value:.6g}")
            else:
                text = str(value)
                if len(text) > 80:
                    text = text[:77] + "..."
                parts.append(f"{key}={text!r}" if isinstance(value, str) else f"{key}={text}")
        return " ".join(parts)

    __repr__ = __str__


class PlainMessagesFilter(logging.Filter):
    """Let only plain messages through (drop metric records).

    Put on console handlers: per-step metrics belong in CSV/TensorBoard, and a
    synchronous console write per step would be disk/terminal I/O on the
    training thread.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return metrics_of(record) is None


class MetricRecordsFilter(logging.Filter):
    """Let only metric records through (the inverse of :class:`PlainMessagesFilter`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return metrics_of(record) is not None


def emit_metrics(
    logger: logging.Logger,
    metrics: Mapping[str, Any],
    step: int | None = None,
    message: str | None = None,
    level: int = logging.INFO,
) -> None:
    """Log one metric record as cheaply as the stdlib allows.

    Skips ``Logger.findCaller`` (a stack walk; the call site of a helper is
    meaningless) and copies ``metrics`` so the caller may reuse its dict. The
    text rendering of the values is deferred to whichever handler formats it.
    """
    if not logger.isEnabledFor(level):
        return
    snapshot = dict(metrics)
    text = KeyValueText(snapshot)
    if message is not None:
        msg, args = message + ": %s", (text,)
    elif step is not None:
        msg, args = "step %s: %s", (step, text)
    else:
        msg, args = "%s", (text,)
    record = logger.makeRecord(
        logger.name,
        level,
        "(lmcleaner.telemetry)",
        0,
        msg,
        args,
        None,
        extra={METRICS_ATTR: snapshot, STEP_ATTR: step},
    )
    logger.handle(record)
