"""CSVHandler: concurrency, header growth, resume, background writing."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from lmcleaner.telemetry import CSVHandler

from ._helpers import read_csv


def _log(logger: logging.Logger, step: int | None = None, **metrics: object) -> None:
    logger.info("m", extra={"metrics": metrics, "step": step})


def test_eight_threads_ten_thousand_records_each_all_rows_present(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "concurrent.csv"
    # A small queue forces producers to wait on the writer (back-pressure path).
    handler = CSVHandler(path, queue_size=256)
    isolated_logger.addHandler(handler)
    n_threads, n_records = 8, 10_000
    barrier = threading.Barrier(n_threads)

    def produce(t: int) -> None:
        barrier.wait()
        for i in range(n_records):
            _log(isolated_logger, step=i, thread=t, i=i, value=t * 1_000_000 + i, text=f"t{t},\"i\"\n{i}")

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    handler.close()

    header, rows = read_csv(path)  # also checks every row has len(header) cells
    assert header == ["timestamp", "step", "thread", "i", "value", "text"]
    assert len(rows) == n_threads * n_records
    seen = set()
    last_i = {t: -1 for t in range(n_threads)}
    for row in rows:
        t, i = int(row["thread"]), int(row["i"])
        assert int(row["value"]) == t * 1_000_000 + i
        assert int(row["step"]) == i
        assert row["text"] == f"t{t},\"i\"\n{i}"  # quoting round-trips commas, quotes, newlines
        assert float(row["timestamp"]) > 0
        assert i > last_i[t], "rows of one thread must keep their emit order"
        last_i[t] = i
        seen.add((t, i))
    assert len(seen) == n_threads * n_records
    assert handler.dropped == 0


def test_header_grows_without_losing_rows(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "grow.csv"
    handler = CSVHandler(path)
    isolated_logger.addHandler(handler)
    _log(isolated_logger, 0, a=1)
    _log(isolated_logger, 1, a=2)
    handler.flush()  # the first header is on disk before the new key arrives
    assert read_csv(path)[0] == ["timestamp", "step", "a"]
    _log(isolated_logger, 2, a=3, b="x")
    handler.flush()
    _log(isolated_logger, 3, c=4.5)
    handler.close()

    header, rows = read_csv(path)
    assert header == ["timestamp", "step", "a", "b", "c"]
    assert [(r["step"], r["a"], r["b"], r["c"]) for r in rows] == [
        ("0", "1", "", ""),
        ("1", "2", "", ""),
        ("2", "3", "x", ""),
        ("3", "", "", "4.5"),
    ]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "grow.csv"]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_header_growth_while_threads_write(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "grow_concurrent.csv"
    handler = CSVHandler(path, batch_size=64)  # many batches -> many rewrites interleaved with appends
    isolated_logger.addHandler(handler)
    n_threads, n_records = 4, 3000

    def produce(t: int) -> None:
        for i in range(n_records):
            metrics = {"thread": t, "i": i}
            if i >= n_records // 2:
                metrics[f"late_{t}"] = i  # a new column appears mid-run for each thread
            isolated_logger.info("m", extra={"metrics": metrics})

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    handler.close()

    header, rows = read_csv(path)
    assert header[:4] == ["timestamp", "step", "thread", "i"]
    assert sorted(header[4:]) == [f"late_{t}" for t in range(n_threads)]
    assert len(rows) == n_threads * n_records
    assert len({(r["thread"], r["i"]) for r in rows}) == n_threads * n_records
    for row in rows:
        t, i = int(row["thread"]), int(row["i"])
        for other in range(n_threads):
            expected = str(i) if other == t and i >= n_records // 2 else ""
            assert row[f"late_{other}"] == expected


def test_resume_appends_under_existing_header(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "resume.csv"
    first = CSVHandler(path)
    isolated_logger.addHandler(first)
    for step in range(3):
        _log(isolated_logger, step, loss=1.0 / (step + 1))
    isolated_logger.removeHandler(first)
    first.close()
    inode = os.stat(path).st_ino

    second = CSVHandler(path)
    assert second.fieldnames == ["timestamp", "step", "loss"]  # header read from the file
    isolated_logger.addHandler(second)
    for step in range(3, 5):
        _log(isolated_logger, step, loss=1.0 / (step + 1))
    second.close()

    assert os.stat(path).st_ino == inode, "same keys must append, not rewrite the file"
    header, rows = read_csv(path)
    assert header == ["timestamp", "step", "loss"]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [float(r["loss"]) for r in rows] == [1.0 / (s + 1) for s in range(5)]


def test_resume_with_new_key_keeps_old_rows(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "resume_wider.csv"
    path.write_text("timestamp,step,loss\n1.0,0,0.5\n2.0,1,0.25")  # no trailing newline (e.g. killed run)
    handler = CSVHandler(path)
    isolated_logger.addHandler(handler)
    _log(isolated_logger, 2, loss=0.125, grad_norm=3.0)
    handler.close()

    header, rows = read_csv(path)
    assert header == ["timestamp", "step", "loss", "grad_norm"]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in rows] == [
        ("0", "0.5", ""),
        ("1", "0.25", ""),
        ("2", "0.125", "3.0"),
    ]


def test_resume_without_trailing_newline_appends_on_new_line(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "resume_nl.csv"
    path.write_text("timestamp,step,loss\n1.0,0,0.5")
    handler = CSVHandler(path)
    isolated_logger.addHandler(handler)
    _log(isolated_logger, 1, loss=0.25)
    handler.close()
    _, rows = read_csv(path)
    assert [(r["step"], r["loss"]) for r in rows] == [("0", "0.5"), ("1", "0.25")]


def test_plain_messages_are_ignored_and_tensors_become_numbers(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "mixed.csv"
    handler = CSVHandler(path)
    isolated_logger.addHandler(handler)
    isolated_logger.info("just a message")
    _log(isolated_logger, 7, loss=torch.tensor(0.5), note=None)
    handler.close()
    header, rows = read_csv(path)
    assert header == ["timestamp", "step", "loss", "note"]
    assert rows == [{"timestamp": rows[0]["timestamp"], "step": "7", "loss": "0.5", "note": ""}]


def test_no_file_is_created_without_metric_records(tmp_path: Path) -> None:
    handler = CSVHandler(tmp_path / "sub" / "never.csv")
    handler.close()
    assert not (tmp_path / "sub").exists()


class _SlowCSVHandler(CSVHandler):
    """Records which thread writes and makes every write slow."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.writer_threads: set[int] = set()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def write_batch(self, records: list[logging.LogRecord]) -> None:
        self.writer_threads.add(threading.get_ident())
        time.sleep(0.3)
        super().write_batch(records)


def test_emit_only_enqueues_and_flush_waits_for_the_writer(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "slow.csv"
    handler = _SlowCSVHandler(path)
    isolated_logger.addHandler(handler)
    start = time.perf_counter()
    for step in range(100):
        _log(isolated_logger, step, loss=float(step))
    enqueue_s = time.perf_counter() - start
    assert enqueue_s < 0.25, f"emitting 100 records took {enqueue_s:.3f}s: I/O on the caller's thread?"
    handler.flush()  # must block until the slow writer has written all 100
    _, rows = read_csv(path)
    assert len(rows) == 100
    assert threading.get_ident() not in handler.writer_threads
    handler.close()


def test_records_after_close_are_counted_not_raised(tmp_path: Path) -> None:
    handler = CSVHandler(tmp_path / "closed.csv")
    handler.close()
    handler.handle(logging.makeLogRecord({"msg": "late", "metrics": {"a": 1}}))
    assert handler.dropped == 1


@pytest.mark.parametrize("bad", [{"queue_size": -1}, {"batch_size": 0}])
def test_invalid_buffer_sizes_are_rejected(tmp_path: Path, bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        CSVHandler(tmp_path / "x.csv", **bad)


def _rows_when(path: Path, at_least: int, timeout: float = 10.0) -> int:
    """Poll the file (no flush()) until it has ``at_least`` rows; return the count seen."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        if path.exists():
            count = len(read_csv(path)[1])
            if count >= at_least:
                break
        time.sleep(0.02)
    return count


def test_writer_wakes_on_its_interval_without_flush(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "interval.csv"
    handler = CSVHandler(path, flush_interval_s=0.05)
    isolated_logger.addHandler(handler)
    for step in range(3):
        _log(isolated_logger, step, loss=1.0)
    assert _rows_when(path, 3) == 3
    handler.close()


def test_full_batch_wakes_the_writer_before_its_interval(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "batch.csv"
    handler = CSVHandler(path, batch_size=10, flush_interval_s=600)
    isolated_logger.addHandler(handler)
    for step in range(25):
        _log(isolated_logger, step, loss=1.0)
    assert _rows_when(path, 20) >= 20  # two full batches written long before 600 s
    handler.close()
    assert len(read_csv(path)[1]) == 25


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_drops_records_instead_of_hanging(tmp_path: Path, isolated_logger: logging.Logger) -> None:
    path = tmp_path / "fork.csv"
    handler = CSVHandler(path)
    isolated_logger.addHandler(handler)
    _log(isolated_logger, 0, who="parent")
    pid = os.fork()
    if pid == 0:  # child: logging and flushing must neither block nor write
        code = 1
        try:
            _log(isolated_logger, 1, who="child")
            handler.flush()
            code = 0 if handler.dropped == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    _log(isolated_logger, 2, who="parent")
    handler.close()
    assert [r["who"] for r in read_csv(path)[1]] == ["parent", "parent"]
