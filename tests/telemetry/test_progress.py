"""log_training_progress / log_model_output, with and without a session."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch

from lmcleaner import telemetry

from ._helpers import read_csv


def test_training_progress_rows_and_tensor_values(session: telemetry.TelemetrySession) -> None:
    metrics = {"loss": torch.tensor(2.5), "lr": 1e-4}
    telemetry.log_training_progress(0, metrics)
    metrics["loss"] = torch.tensor(1.5)  # reusing the dict must not change the logged row
    telemetry.log_training_progress(1, metrics)
    telemetry.shutdown()
    header, rows = read_csv(session.output_dir / "training.csv")
    assert header == ["timestamp", "step", "loss", "lr"]
    assert [(r["step"], r["loss"], r["lr"]) for r in rows] == [("0", "2.5", "0.0001"), ("1", "1.5", "0.0001")]


def test_logging_frequency_keeps_every_nth_step(tmp_path: Path) -> None:
    session = telemetry.initialize(output_dir=tmp_path, logging_frequency=5)
    for step in range(23):
        telemetry.log_training_progress(step, {"loss": float(step)})
    telemetry.shutdown()
    _, rows = read_csv(session.output_dir / "training.csv")
    assert [int(r["step"]) for r in rows] == [0, 5, 10, 15, 20]


def test_model_outputs_go_to_their_own_csv(session: telemetry.TelemetrySession) -> None:
    telemetry.log_model_output("What is 6*7?", "42", "<think>6*7=42</think> 42", reasoning="6*7=42", answer="42", step=3)
    telemetry.log_model_output("Capital of France?", "Paris", "Paris, of course,\n\"Paris\"")
    telemetry.shutdown()
    header, rows = read_csv(session.output_dir / "model_outputs.csv")
    assert header == ["timestamp", "step", "question", "true_answer", "model_output", "reasoning", "answer"]
    assert rows[0]["step"] == "3" and rows[0]["reasoning"] == "6*7=42" and rows[0]["answer"] == "42"
    assert rows[1]["model_output"] == "Paris, of course,\n\"Paris\""
    assert rows[1]["step"] == rows[1]["reasoning"] == rows[1]["answer"] == ""
    assert not (session.output_dir / "training.csv").exists()


def test_console_shows_messages_but_not_metric_records(session: telemetry.TelemetrySession) -> None:
    console = session.handlers["console"]
    assert isinstance(console, logging.StreamHandler)
    buffer = io.StringIO()
    console.setStream(buffer)
    telemetry.log_training_progress(1, {"loss": 0.123})
    telemetry.get_model_logger().info("loaded tiny model")
    telemetry.flush()
    assert "loaded tiny model" in buffer.getvalue()
    assert "0.123" not in buffer.getvalue()
    assert "loss=0.123" in (session.log_dir / "lmcleaner.log").read_text()  # but the text log has it


def test_helpers_work_without_a_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert not telemetry.is_initialized()
    telemetry.log_training_progress(1, {"loss": 0.5})
    telemetry.log_model_output("q", "a", "a")
    telemetry.log_reward_metrics(1, {"f": [1.0, 0.0]})
    stats = telemetry.log_memory_usage()
    assert stats["rss_mb"] > 0
    telemetry.flush()
    telemetry.shutdown()
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_without_a_session_records_reach_plain_logging(caplog: pytest.LogCaptureFixture) -> None:
    metrics = {"loss": 0.25}
    with caplog.at_level(logging.INFO, logger="lmcleaner"):
        telemetry.log_training_progress(4, metrics)
    (record,) = [r for r in caplog.records if r.name == "lmcleaner.training"]
    assert record.getMessage() == "step 4: loss=0.25"
    assert record.metrics == {"loss": 0.25} and record.step == 4
    assert record.metrics is not metrics  # a snapshot: the caller may reuse its dict


def test_emit_metrics_is_a_cheap_no_op_when_nobody_listens() -> None:
    # Root is at WARNING and nothing is configured: isEnabledFor() short-circuits,
    # so not even the metrics dict is read.
    class Exploding(dict):
        def __iter__(self):  # type: ignore[override]
            raise AssertionError("metrics were read although logging is off")

        def keys(self):  # type: ignore[override]
            raise AssertionError("metrics were read although logging is off")

    assert not telemetry.get_training_logger().isEnabledFor(logging.INFO)
    telemetry.log_training_progress(1, Exploding(loss=1.0))


def test_metric_logger_protocol() -> None:
    assert isinstance(telemetry.LoggingMetricLogger(), telemetry.MetricLogger)
    assert isinstance(telemetry.NullMetricLogger(), telemetry.MetricLogger)
    telemetry.NullMetricLogger().log_metrics(1, {"loss": 1.0})


def test_logging_metric_logger_routes_to_named_logger(tmp_path: Path) -> None:
    session = telemetry.initialize(output_dir=tmp_path)
    telemetry.LoggingMetricLogger(telemetry.METRICS_LOGGER).log_metrics(7, {"acc": 0.9})
    telemetry.shutdown()
    _, rows = read_csv(session.output_dir / "metrics.csv")
    assert [(r["step"], r["acc"]) for r in rows] == [("7", "0.9")]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_plain_lines_when_not_a_terminal(monkeypatch) -> None:
    monkeypatch.delenv("LMCLEANER_PROGRESS", raising=False)
    out = io.StringIO()
    with telemetry.progress_bar(total=40, desc="replay", unit="step", file=out) as bar:
        for _ in range(40):
            bar.update(1)
            bar.set_postfix(loss=1.0)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10  # one line every 10%, the last says done
    assert lines[0].startswith("replay: 4/40 (10%) elapsed") and "ETA" in lines[0] and "[loss=1.0]" in lines[0]
    assert lines[-1].startswith("replay: 40/40 (100%) done in")
    # transient inner bars print nothing off a terminal; a terminal gets tqdm (with its ETA)
    quiet = io.StringIO()
    for _ in telemetry.progress_bar(range(5), desc="inner", leave=False, file=quiet):
        pass
    assert quiet.getvalue() == ""
    tty = _Tty()
    for _ in telemetry.progress_bar(range(3), desc="bar", file=tty):
        pass
    assert "bar: 100%" in tty.getvalue() and "<" in tty.getvalue()  # tqdm's elapsed<remaining
    monkeypatch.setenv("LMCLEANER_PROGRESS", "off")
    off = io.StringIO()
    for _ in telemetry.progress_bar(range(3), desc="x", file=off):
        pass
    assert off.getvalue() == ""
