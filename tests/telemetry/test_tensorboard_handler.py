"""TensorBoardHandler: event files read back with TensorBoard's own reader."""

from __future__ import annotations

import logging
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmcleaner import telemetry
from lmcleaner.telemetry import TensorBoardHandler


def _load(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(ev.step, ev.tensor_proto.string_val[0].decode()) for ev in acc.Tensors(tag)]


def _record(name: str, msg: str, **extra: object) -> logging.LogRecord:
    return logging.makeLogRecord({"name": name, "msg": msg, "levelno": logging.INFO, "levelname": "INFO", **extra})


def test_scalars_use_record_step_and_logger_prefix(tmp_path: Path) -> None:
    handler = TensorBoardHandler(tmp_path / "tb")
    for step in range(0, 50, 5):
        handler.handle(_record("lmcleaner.training", "m", metrics={"loss": 1.0 / (step + 1), "lr": 1e-3}, step=step))
    handler.handle(_record("lmcleaner.reward", "m", metrics={"acc/mean": 0.75}, step=3))
    handler.close()

    acc = _load(tmp_path / "tb")
    assert {"training/loss", "training/lr", "reward/acc/mean"} <= set(acc.Tags()["scalars"])
    loss = acc.Scalars("training/loss")
    assert [e.step for e in loss] == list(range(0, 50, 5))
    for event in loss:
        assert abs(event.value - 1.0 / (event.step + 1)) < 1e-6
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("reward/acc/mean")] == [(3, 0.75)]


def test_plain_messages_and_string_values_become_text(tmp_path: Path) -> None:
    handler = TensorBoardHandler(tmp_path / "tb")
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.handle(_record("lmcleaner.system", "first message"))
    handler.handle(_record("lmcleaner.system", "second message"))
    handler.handle(_record("lmcleaner.model.outputs", "m", metrics={"model_output": "42", "score": 1.0}, step=9))
    handler.close()

    acc = _load(tmp_path / "tb")
    # Messages without a step get 0, 1, ... per tag instead of all landing at 0.
    assert _text(acc, "system/log/text_summary") == [(0, "INFO first message"), (1, "INFO second message")]
    assert _text(acc, "model.outputs/model_output/text_summary") == [(9, "42")]
    assert [e.step for e in acc.Scalars("model.outputs/score")] == [9]


def test_no_event_file_without_records(tmp_path: Path) -> None:
    TensorBoardHandler(tmp_path / "tb").close()
    assert not (tmp_path / "tb").exists()


def test_default_session_writes_training_scalars(tmp_path: Path) -> None:
    session = telemetry.initialize(output_dir=tmp_path)
    for step in range(10):
        telemetry.log_training_progress(step, {"loss": 10.0 - step})
    telemetry.shutdown()

    acc = _load(session.tensorboard_dir)
    assert [(e.step, e.value) for e in acc.Scalars("training/loss")] == [(s, 10.0 - s) for s in range(10)]


class _PublicApiOnly:
    """A SummaryWriter seen only through its public methods."""

    def __init__(self, writer: object) -> None:
        self._w = writer

    def add_scalar(self, *args: object, **kwargs: object) -> None:
        self._w.add_scalar(*args, **kwargs)  # type: ignore[attr-defined]

    def add_text(self, *args: object, **kwargs: object) -> None:
        self._w.add_text(*args, **kwargs)  # type: ignore[attr-defined]

    def flush(self) -> None:
        self._w.flush()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._w.close()  # type: ignore[attr-defined]


class _PublicApiHandler(TensorBoardHandler):
    def _summary_writer(self) -> object:
        if self._writer is None:
            self._writer = _PublicApiOnly(super()._summary_writer())
        return self._writer


def test_add_scalar_fallback_writes_the_same_scalars(tmp_path: Path) -> None:
    handler = _PublicApiHandler(tmp_path / "tb")
    for step in range(3):
        handler.handle(_record("lmcleaner.training", "m", metrics={"loss": float(step), "lr": 0.1}, step=step))
    handler.close()
    acc = _load(tmp_path / "tb")
    assert [(e.step, e.value) for e in acc.Scalars("training/loss")] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert len(acc.Scalars("training/lr")) == 3
