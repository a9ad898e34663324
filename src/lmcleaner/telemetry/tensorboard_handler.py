"""TensorBoard event files from log records, written on a background thread.

* metric records: every numeric value becomes a scalar, every string value a
  text summary;
* plain messages: the formatted message becomes a text summary.

Tags are ``<logger short name>/<key>`` (``lmcleaner.training`` + ``loss`` ->
``training/loss``; plain messages of ``lmcleaner.system`` -> ``system/log``),
so one handler on the ``lmcleaner`` logger separates the sources without any
per-logger configuration. The step is the record's ``extra["step"]``; records
without one get a counter (per logger for metrics, per tag for messages) so
their points do not all pile up at step 0.

``torch.utils.tensorboard`` is imported when the handler is created, on the
caller's thread: importing torch from the writer thread races with imports on
the main thread (partially initialised modules) and fails outright during
interpreter shutdown. The event file itself is only created at the first
record, so an unused handler leaves no empty run in TensorBoard.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .background import BackgroundHandler
from .names import short_name
from .records import as_scalar, metrics_of, step_of, to_python_value


class TensorBoardHandler(BackgroundHandler):
    """Write scalars and text to TensorBoard via ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        log_dir: directory for the event files (created on first record).
        text_for_messages: write plain messages as text summaries.
        flush_secs / max_queue: passed to ``SummaryWriter``.
        queue_size / batch_size / flush_interval_s: see :class:`BackgroundHandler`.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        text_for_messages: bool = True,
        level: int | str = logging.NOTSET,
        flush_secs: int = 30,
        max_queue: int = 100,
        queue_size: int = 10_000,
        batch_size: int = 1024,
        flush_interval_s: float = 1.0,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.text_for_messages = text_for_messages
        self._flush_secs = flush_secs
        self._max_queue = max_queue
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self._summary_class = Summary
        self._writer: Any = None
        self._auto_step: dict[str, int] = defaultdict(int)
        super().__init__(level=level, queue_size=queue_size, batch_size=batch_size, flush_interval_s=flush_interval_s)

    def accepts(self, record: logging.LogRecord) -> bool:
        return self.text_for_messages or metrics_of(record) is not None

    def _summary_writer(self) -> Any:
        if self._writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = self._writer_class(
                log_dir=str(self.log_dir), max_queue=self._max_queue, flush_secs=self._flush_secs
            )
        return self._writer

    def _step(self, record: logging.LogRecord, key: str) -> int:
        step = step_of(record)
        if step is not None:
            return step
        step = self._auto_step[key]
        self._auto_step[key] = step + 1
        return step

    def _add_scalars(self, writer: Any, scalars: list[tuple[str, float]], step: int, walltime: float) -> None:
        """All scalars of one record as one event.

        Same data as one ``add_scalar`` per value, but TensorBoard checksums
        every event in pure Python (no TensorFlow installed), so one event per
        record instead of one per metric cuts the writer's CPU time ~3x.
        """
        get_file_writer = getattr(writer, "_get_file_writer", None)
        if get_file_writer is None:  # a torch without the internal: public API
            for tag, value in scalars:
                writer.add_scalar(tag, value, step, walltime=walltime)
            return
        values = [self._summary_class.Value(tag=tag, simple_value=value) for tag, value in scalars]
        get_file_writer().add_summary(self._summary_class(value=values), step, walltime)

    def write_batch(self, records: list[logging.LogRecord]) -> None:
        writer = self._summary_writer()
        for record in records:
            prefix = short_name(record.name)
            metrics = metrics_of(record)
            if metrics is None:
                tag = f"{prefix}/log"
                writer.add_text(tag, self.format(record), self._step(record, tag), walltime=record.created)
                continue
            step = self._step(record, prefix)
            scalars: list[tuple[str, float]] = []
            for key, value in metrics.items():
                scalar = as_scalar(value)
                if scalar is not None:
                    scalars.append((f"{prefix}/{key}", scalar))
                    continue
                value = to_python_value(value)
                if isinstance(value, str) and value:
                    writer.add_text(f"{prefix}/{key}", value, step, walltime=record.created)
            if scalars:
                self._add_scalars(writer, scalars, step, record.created)

    def flush_resources(self, requested: bool) -> None:
        # SummaryWriter flushes itself every ``flush_secs``; flushing after
        # every batch would cost a write per batch. flush()/close() do flush.
        if requested and self._writer is not None:
            self._writer.flush()

    def close_resources(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
