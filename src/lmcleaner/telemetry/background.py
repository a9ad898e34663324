"""Base class for handlers that write on a background thread.

Why not stdlib ``QueueHandler`` + ``QueueListener``: they need two objects
wired together, which ``logging.config.dictConfig`` on Python 3.11 cannot
express, and the listener wakes up for every single record. This class is the
same producer/consumer pattern in one handler that can be named in YAML:

* ``emit`` (the caller's thread) only appends the record to a
  ``queue.SimpleQueue`` (a C-level append, no thread is notified);
* one daemon thread per handler wakes every ``flush_interval_s`` seconds (or
  as soon as ``batch_size`` records are waiting), takes everything queued and
  calls :meth:`BackgroundHandler.write_batch`, then flushes once;
* :meth:`flush` blocks until every record queued before the call is written;
  :meth:`close` drains the queue, then releases resources on the writer
  thread. ``logging.shutdown`` (atexit) calls both, so no record is lost.

Why wake on a timer instead of per record: a writer thread that wakes for
every record needs the GIL right when the training loop has it, and the
hand-back can stall the training thread for a whole GIL switch interval
(5 ms) per record. Waking a few times per second keeps that cost off the
training loop; the price is that rows reach the disk up to
``flush_interval_s`` later (``flush()`` forces it).

At most ``queue_size`` records wait (0 = unbounded): when the disk cannot
keep up, callers wait instead of records being dropped or memory growing
without limit.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from typing import Any

_FLUSH_TIMEOUT_S = 60.0
_live_handlers: "weakref.WeakSet[BackgroundHandler]" = weakref.WeakSet()


def _disable_in_forked_child() -> None:
    """A forked child (e.g. a DataLoader worker) has no writer threads.

    Its copies of the handlers are marked closed so records logged there are
    counted in ``dropped`` instead of piling up in a queue nobody drains, and
    ``flush()`` returns at once. Only the parent writes the files.
    """
    for handler in list(_live_handlers):
        # A parent thread may have held the lock at fork time: start fresh.
        handler._state_lock = threading.Lock()
        handler._space = threading.Condition(handler._state_lock)
        handler._closed = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disable_in_forked_child)


def _report_writer_error() -> None:
    """Print a writer-thread failure that has no record to attach it to."""
    if logging.raiseExceptions:
        import sys
        import traceback

        sys.stderr.write("--- lmcleaner.telemetry writer error ---\n")
        traceback.print_exc(file=sys.stderr)


class _Stop:
    """Sentinel: the writer thread exits after the records before it."""


class BackgroundHandler(logging.Handler):
    """A ``logging.Handler`` whose I/O runs on its own writer thread.

    Subclasses implement :meth:`write_batch` (and optionally
    :meth:`flush_resources` / :meth:`close_resources`); those are only ever
    called on the writer thread, so they need no locking of their own.

    Args:
        queue_size: most records waiting to be written before ``emit`` blocks
            (0 = unbounded).
        batch_size: most records per ``write_batch`` call; this many waiting
            records also wake the writer before its interval is up.
        flush_interval_s: how often the writer wakes to write what is queued.
    """

    def __init__(
        self,
        level: int | str = logging.NOTSET,
        queue_size: int = 10_000,
        batch_size: int = 1024,
        flush_interval_s: float = 1.0,
    ) -> None:
        # Validate before Handler.__init__ registers us with logging: a
        # half-built handler there would break logging.shutdown() later.
        if int(queue_size) < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not float(flush_interval_s) > 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        super().__init__(level)
        self.queue_size = int(queue_size)
        self.batch_size = int(batch_size)
        self.flush_interval_s = float(flush_interval_s)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Guards _pending/_closed and serialises "is it closed?" with the put,
        # so a record cannot slip in behind the stop sentinel and be lost.
        self._state_lock = threading.Lock()
        self._space = threading.Condition(self._state_lock)
        self._pending = 0
        self._closed = False
        self._wake = threading.Event()
        self.dropped = 0  # records emitted after close(); should stay 0
        self._thread = threading.Thread(
            target=self._run, name=f"lmcleaner-telemetry-{type(self).__name__}", daemon=True
        )
        self._thread.start()
        _live_handlers.add(self)

    # ----------------------------------------------------------- caller side
    def accepts(self, record: logging.LogRecord) -> bool:
        """Cheap pre-check on the caller thread; records refused here are never queued."""
        return True

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        """Filter and enqueue without taking the handler lock (the queue is thread-safe)."""
        rv = self.filter(record)
        if rv:
            self.emit(record)
        return bool(rv)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.accepts(record):
            return
        with self._space:
            if self.queue_size and self._pending >= self.queue_size and threading.current_thread() is not self._thread:
                self._wake.set()
                while self._pending >= self.queue_size and not self._closed and self._thread.is_alive():
                    self._space.wait(0.1)
            if self._closed:
                self.dropped += 1
                return
            self._queue.put(record)
            self._pending += 1
            pending = self._pending
        if pending >= self.batch_size:
            self._wake.set()

    def flush(self) -> None:
        """Block until every record queued before this call has been written."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return
        done = threading.Event()
        with self._state_lock:
            if self._closed:
                return
            self._queue.put(done)
        self._wake.set()
        done.wait(_FLUSH_TIMEOUT_S)

    def close(self) -> None:
        """Write everything still queued, release resources, stop the thread."""
        with self._state_lock:
            already = self._closed
            self._closed = True
            if not already:
                self._queue.put(_Stop)
            self._space.notify_all()
        self._wake.set()
        if not already and threading.current_thread() is not self._thread:
            self._thread.join(_FLUSH_TIMEOUT_S)
        super().close()

    # ----------------------------------------------------------- writer side
    def write_batch(self, records: list[logging.LogRecord]) -> None:
        """Write ``records`` (in emit order). Runs on the writer thread."""
        raise NotImplementedError

    def flush_resources(self, requested: bool) -> None:
        """Push written data to the OS. Writer thread.

        Called after every batch; ``requested`` is true when a :meth:`flush`
        caller is waiting (or the handler is closing), so costly flushes can
        be kept to those.
        """

    def close_resources(self) -> None:
        """Close files/writers. Called once, on the writer thread, after the last batch."""

    def _next_batch(self) -> list[Any]:
        items: list[Any] = []
        while len(items) < self.batch_size:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _write(self, items: list[Any]) -> bool:
        """Write one batch; release flush() waiters; return True at the stop sentinel."""
        records = [it for it in items if isinstance(it, logging.LogRecord)]
        waiters = [it for it in items if isinstance(it, threading.Event)]
        stop = any(it is _Stop for it in items)
        if records:
            try:
                self.write_batch(records)
            except Exception:
                self.handleError(records[0])
        try:
            self.flush_resources(bool(waiters) or stop)
        except Exception:
            _report_writer_error()
        if records:
            with self._space:
                self._pending -= len(records)
                self._space.notify_all()
        for waiter in waiters:
            waiter.set()
        return stop

    def _run(self) -> None:
        stop = False
        while not stop:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            # Drain everything queued so far, batch by batch.
            while not stop:
                items = self._next_batch()
                if not items:
                    break
                stop = self._write(items)
        try:
            self.close_resources()
        except Exception:
            _report_writer_error()
        # Nothing can be queued after _Stop (emit checks _closed under the
        # lock), but release any flush() callers that raced with close().
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, threading.Event):
                item.set()
