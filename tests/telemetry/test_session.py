"""initialize / flush / shutdown: re-initialising, detaching, flushing at exit."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from lmcleaner import telemetry
from lmcleaner.telemetry import BackgroundHandler

from ._helpers import read_csv

SRC = Path(telemetry.__file__).resolve().parents[2]


def _background_handlers() -> list[logging.Handler]:
    names = ["", "lmcleaner", "lmcleaner.training", "lmcleaner.model", "lmcleaner.model.outputs",
             "lmcleaner.reward", "lmcleaner.system", "lmcleaner.metrics"]
    return [h for n in names for h in logging.getLogger(n).handlers if isinstance(h, BackgroundHandler)]


def test_reinitialise_twice_gives_no_duplicate_rows_or_handlers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    expected_handlers = None
    for round_ in range(3):  # initialise, then re-initialise twice
        session = telemetry.initialize(output_dir=out)
        training = telemetry.get_training_logger()
        assert [h.name for h in training.handlers] == ["training_csv"]
        assert [h.name for h in logging.getLogger("lmcleaner").handlers] == ["console", "text_log", "tensorboard"]
        if expected_handlers is None:
            expected_handlers = len(_background_handlers())
        assert len(_background_handlers()) == expected_handlers
        for step in range(round_ * 10, round_ * 10 + 10):
            telemetry.log_training_progress(step, {"loss": float(step)})
    telemetry.shutdown()

    _, rows = read_csv(out / "training.csv")
    assert [int(r["step"]) for r in rows] == list(range(30))
    assert [float(r["loss"]) for r in rows] == [float(s) for s in range(30)]
    log_lines = [l for l in (out / "logs" / "lmcleaner.log").read_text().splitlines() if "lmcleaner.training" in l]
    assert len(log_lines) == 30
    assert session.output_dir == out


def test_previous_handlers_are_closed_on_reinitialise(tmp_path: Path) -> None:
    first = telemetry.initialize(output_dir=tmp_path / "a")
    old = list(first.handlers.values())
    telemetry.initialize(output_dir=tmp_path / "b")
    for handler in old:
        if isinstance(handler, BackgroundHandler):
            assert handler._closed and not handler._thread.is_alive()
    assert not set(map(id, old)) & {id(h) for h in _background_handlers()}


def test_shutdown_flushes_detaches_and_is_idempotent(tmp_path: Path) -> None:
    session = telemetry.initialize(output_dir=tmp_path)
    for step in range(500):
        telemetry.log_training_progress(step, {"loss": 1.0})
    telemetry.shutdown()
    telemetry.shutdown()
    assert not telemetry.is_initialized()
    assert len(read_csv(session.output_dir / "training.csv")[1]) == 500
    assert _background_handlers() == []
    assert telemetry.get_training_logger().level == logging.NOTSET
    # After shutdown the helpers are plain logging calls again: no error, no new rows.
    telemetry.log_training_progress(500, {"loss": 1.0})
    assert len(read_csv(session.output_dir / "training.csv")[1]) == 500


def test_flush_makes_rows_visible_while_running(session: telemetry.TelemetrySession) -> None:
    for step in range(20):
        telemetry.log_training_progress(step, {"loss": 1.0})
    telemetry.flush()
    assert len(read_csv(session.output_dir / "training.csv")[1]) == 20
    assert "step 19" in (session.log_dir / "lmcleaner.log").read_text()


def test_records_are_flushed_at_exit_without_explicit_shutdown(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from lmcleaner import telemetry
        telemetry.initialize(output_dir={str(tmp_path)!r})
        for step in range(5000):
            telemetry.log_training_progress(step, {{"loss": step * 0.5}})
        # no shutdown(): the atexit hook must drain the writer threads
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("LMCLEANER_TELEMETRY_DIR", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    _, rows = read_csv(tmp_path / "training.csv")
    assert [int(r["step"]) for r in rows] == list(range(5000))
    assert float(rows[-1]["loss"]) == 4999 * 0.5


def test_initialize_does_not_touch_root_logger(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    telemetry.initialize(output_dir=tmp_path)
    assert root.handlers == before
    telemetry.shutdown()
    assert root.handlers == before
