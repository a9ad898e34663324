"""CSV file of metric records, written on a background thread.

One row per metric record (see :mod:`lmcleaner.telemetry.records`); plain
messages are ignored. Columns are ``timestamp, step`` followed by the metric
keys in the order they were first seen.

Why the header can grow: which metrics exist is often only known as training
runs (``eval_loss`` appears at the first evaluation, ``train_runtime`` at the
end). When a batch brings new keys, the file is rewritten once with the wider
header into a temporary file in the same directory and swapped in with
``os.replace`` (atomic on POSIX and Windows), so a crash leaves either the old
or the new complete file, and rows written before keep their values, padded
with empty cells for the new columns.

Why it appends: a resumed run must not lose the rows of the run it resumes,
so an existing file is never truncated; its header is read at start-up and
new rows are appended under it (widened when needed).
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .background import BackgroundHandler
from .records import metrics_of, step_of, to_python_value

DEFAULT_BASE_FIELDS: tuple[str, ...] = ("timestamp", "step")


def _cell(value: Any) -> Any:
    """A CSV cell for ``value``: ``None`` -> empty, tensors -> numbers."""
    value = to_python_value(value)
    return "" if value is None else value


class CSVHandler(BackgroundHandler):
    """Write metric records as CSV rows, off the caller's thread.

    Args:
        filename: the CSV file; parent directories are created on first write.
        base_fields: leading columns filled from the record itself
            (``timestamp`` = ``record.created``, ``step`` = ``extra["step"]``).
        queue_size / batch_size / flush_interval_s: see :class:`BackgroundHandler`.

    One handler per file: two handlers appending to the same file would
    interleave header rewrites.
    """

    def __init__(
        self,
        filename: str | os.PathLike[str],
        base_fields: Sequence[str] = DEFAULT_BASE_FIELDS,
        level: int | str = logging.NOTSET,
        queue_size: int = 10_000,
        batch_size: int = 1024,
        flush_interval_s: float = 1.0,
        encoding: str = "utf-8",
    ) -> None:
        self.path = Path(filename)
        self.encoding = encoding
        self._base_fields = list(base_fields)
        self._fields: list[str] = []
        self._field_set: set[str] = set()
        self._header_on_disk = False
        self._needs_newline = False
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._read_existing_header()
        super().__init__(level=level, queue_size=queue_size, batch_size=batch_size, flush_interval_s=flush_interval_s)

    @property
    def fieldnames(self) -> list[str]:
        """The current header (written to disk after the next batch)."""
        return list(self._fields or self._base_fields)

    # ----------------------------------------------------------- caller side
    def accepts(self, record: logging.LogRecord) -> bool:
        return metrics_of(record) is not None

    # ----------------------------------------------------------- writer side
    def _read_existing_header(self) -> None:
        """Adopt the header of a file left by an earlier run (resume = append)."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, newline="", encoding=self.encoding) as f:
            header = next(csv.reader(f), None)
        with open(self.path, "rb") as fb:
            fb.seek(-1, os.SEEK_END)
            self._needs_newline = fb.read(1) not in (b"\n", b"\r")
        if header:
            self._fields = list(header)
            self._field_set = set(header)
            self._header_on_disk = True

    def _row(self, record: logging.LogRecord) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for name in self._base_fields:
            if name == "timestamp":
                row[name] = round(record.created, 6)
            elif name == "step":
                row[name] = step_of(record)
            else:
                row[name] = getattr(record, name, None)
        metrics = metrics_of(record) or {}
        for key, value in metrics.items():
            row[str(key)] = value
        return row

    def write_batch(self, records: list[logging.LogRecord]) -> None:
        if not self._fields:
            self._fields = list(self._base_fields)
            self._field_set = set(self._fields)
        rows = [self._row(r) for r in records]
        new_fields: dict[str, None] = {}  # ordered set
        for row in rows:
            for key in row:
                if key not in self._field_set:
                    new_fields[key] = None
        if new_fields:
            wider = self._fields + list(new_fields)
            if self._header_on_disk:
                self._rewrite_with_header(wider)  # raises -> header stays as on disk
            self._fields = wider
            self._field_set.update(new_fields)
        writer = self._open()
        fields = self._fields
        writer.writerows([[_cell(row.get(f)) for f in fields] for row in rows])

    def _open(self) -> Any:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", newline="", encoding=self.encoding)
            self._writer = csv.writer(self._file, lineterminator="\n")
            if self._needs_newline:
                self._file.write("\n")
                self._needs_newline = False
            if not self._header_on_disk:
                self._writer.writerow(self._fields)
                self._header_on_disk = True
        return self._writer

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._writer = None

    def _rewrite_with_header(self, fields: list[str]) -> None:
        """Copy the file under ``fields`` to a temp file, then ``os.replace`` it."""
        self._close_file()
        width = len(fields)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with open(self.path, newline="", encoding=self.encoding) as src, os.fdopen(
                fd, "w", newline="", encoding=self.encoding
            ) as dst:
                reader = csv.reader(src)
                next(reader, None)  # old header
                writer = csv.writer(dst, lineterminator="\n")
                writer.writerow(fields)
                for old in reader:
                    writer.writerow(old + [""] * (width - len(old)))
                dst.flush()
                os.fsync(dst.fileno())
            try:
                os.chmod(tmp_name, os.stat(self.path).st_mode & 0o777)
            except OSError:
                pass
            os.replace(tmp_name, self.path)
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise
        self._needs_newline = False

    def flush_resources(self, requested: bool) -> None:
        if self._file is not None:
            self._file.flush()

    def close_resources(self) -> None:
        self._close_file()
