"""Per-step training metrics, model outputs, and the progress display.

The two logging helpers only build a log record and hand it to the handlers, which queue
it for their writer threads; no file is touched on the caller's thread with
the default configuration. When telemetry is not initialised they are plain
logging calls that return after one ``isEnabledFor`` check unless the user
configured logging for ``lmcleaner.*`` themselves, so a training loop never
needs an ``if telemetry_enabled:`` branch. :func:`progress_bar` is the one
progress display every long loop uses (a tqdm bar with ETA on a terminal,
plain lines every few percent otherwise).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

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


class PlainProgress:
    """What a progress bar prints when the output is not a terminal: one line every ``every`` percent.

    Why: tqdm redraws with carriage returns; redirected to a file (CI, nohup,
    ``> log``) every redraw becomes bytes (a demo log reached 84 KB). Supports
    the part of the tqdm interface lmcleaner uses.
    """

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
                 unit: str = "it", every: float = 10.0, file: IO[str] | None = None, initial: int = 0):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.every = total, desc or "progress", unit, max(float(every), 0.1)
        self.file = file if file is not None else sys.stderr
        self.n = self._start = initial
        self._t0 = self._last_time = time.monotonic()
        self._next = self.every
        self._printed_n = initial  # nothing to report until something happened
        self._postfix = ""
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kw: Any) -> None:
        items = {**(ordered_dict or {}), **kw}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def refresh(self) -> None:
        pass

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.total:
            pct = 100.0 * self.n / self.total
            if pct + 1e-9 >= self._next and self.n < self.total:
                self._line(now)
                self._next = (int(pct / self.every) + 1) * self.every
        elif now - self._last_time >= 30.0:  # unknown length: a line every 30 s
            self._line(now)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._printed_n:
                self._line(time.monotonic())

    def _line(self, now: float) -> None:
        elapsed = now - self._t0
        done = self.n - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else float("nan")
            head = f"{self.desc}: {self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)"
            timing = f"elapsed {_clock(elapsed)}, ETA {_clock(left)}" if self.n < self.total else \
                f"done in {_clock(elapsed)}"
        else:
            head, timing = f"{self.desc}: {self.n} {self.unit}", f"elapsed {_clock(elapsed)}"
        tail = f", {rate:.3g} {self.unit}/s" if rate > 0 else ""
        post = f" [{self._postfix}]" if self._postfix else ""
        print(f"{head} {timing}{tail}{post}", file=self.file, flush=True)
        self._printed_n, self._last_time = self.n, now


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):  # no rate yet
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
                 enabled: bool = True, leave: bool = True, unit: str = "it", every: float = 10.0,
                 file: IO[str] | None = None, initial: int = 0):
    """The one progress display of lmcleaner (training, replay, unlearning, retraining, evaluation, demo).

    On a terminal: a tqdm bar with rate and ETA. Otherwise (a file, a pipe, CI):
    :class:`PlainProgress`, one line every ``every`` percent with elapsed time
    and ETA; transient inner bars (``leave=False``) print nothing there, so a
    redirected log stays a few lines per loop. ``LMCLEANER_PROGRESS=bar|plain|off``
    forces a mode.
    """
    from tqdm.auto import tqdm

    out = file if file is not None else sys.stderr
    mode = os.environ.get("LMCLEANER_PROGRESS", "").lower()
    if not enabled or mode == "off":
        return tqdm(iterable, total=total, disable=True)
    tty = mode == "bar" or (mode != "plain" and hasattr(out, "isatty") and out.isatty())
    if tty:
        return tqdm(iterable, total=total, desc=desc, leave=leave, unit=unit, dynamic_ncols=True, file=out,
                    initial=initial)
    if not leave:
        return tqdm(iterable, total=total, disable=True)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, every=every, file=out, initial=initial)
