"""Plain-text log file written on a background thread.

The stdlib ``FileHandler`` writes on the caller's thread; with per-step
training records propagating to the text log that would put a disk write on
every training step. This handler formats and writes on its writer thread and
flushes once per batch. It appends (a resumed run keeps the earlier log).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO

from .background import BackgroundHandler


class BackgroundFileHandler(BackgroundHandler):
    """Append formatted records to a text file, off the caller's thread."""

    def __init__(
        self,
        filename: str | os.PathLike[str],
        level: int | str = logging.NOTSET,
        encoding: str = "utf-8",
        queue_size: int = 10_000,
        batch_size: int = 1024,
        flush_interval_s: float = 1.0,
    ) -> None:
        self.path = Path(filename)
        self.encoding = encoding
        self._file: IO[str] | None = None
        super().__init__(level=level, queue_size=queue_size, batch_size=batch_size, flush_interval_s=flush_interval_s)

    def write_batch(self, records: list[logging.LogRecord]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding=self.encoding)
        lines = []
        for record in records:
            try:
                lines.append(self.format(record) + "\n")
            except Exception:
                self.handleError(record)
        self._file.write("".join(lines))

    def flush_resources(self, requested: bool) -> None:
        if self._file is not None:
            self._file.flush()

    def close_resources(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
