"""YAML loading: one-line errors naming the bad key, paths, overrides, propagate."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmcleaner import telemetry
from lmcleaner.telemetry import BackgroundHandler, TelemetryConfigError, default_config_path

from ._helpers import read_csv


def write_config(tmp_path: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    """The default YAML with ``mutate`` applied, written to ``tmp_path``."""
    cfg = yaml.safe_load(default_config_path().read_text())
    mutate(cfg)
    path = tmp_path / "logging.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _set(section: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg[section][key] = value

    return mutate


def _handler_set(name: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["handlers"][name][key] = value

    return mutate


def _logger_set(name: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["loggers"][name][key] = value

    return mutate


def _top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg[key] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "key", "detail"),
    [
        (_set("metrics", "logging_freq", 10), "metrics.logging_freq", "unknown key"),
        (_set("metrics", "logging_frequency", "ten"), "metrics.logging_frequency", "expected an integer"),
        (_set("metrics", "validation_frequency", 0), "metrics.validation_frequency", ">= 1"),
        (_set("metrics", "queue_size", 1.5), "metrics.queue_size", "expected an integer"),
        (_set("metrics", "output_dir", 3), "metrics.output_dir", "path"),
        (_set("metrics", "logging_frequency", True), "metrics.logging_frequency", "bool"),
        (_handler_set("training_csv", "class", "no_such_pkg.CSVHandler"), "handlers.training_csv.class", "cannot import"),
        (_handler_set("training_csv", "class", "collections.OrderedDict"), "handlers.training_csv.class", "not a logging.Handler"),
        (_handler_set("training_csv", "filenme", "x.csv"), "handlers.training_csv.filenme", "not an argument"),
        (_handler_set("console", "formatter", "fancy"), "handlers.console.formatter", "'fancy'"),
        (_handler_set("console", "level", "LOUD"), "handlers.console.level", "unknown level"),
        (_handler_set("training_csv", "filename", "${outdir}/t.csv"), "handlers.training_csv.filename", "placeholder"),
        (_logger_set("lmcleaner.training", "handlers", ["nope"]), "loggers.lmcleaner.training.handlers", "'nope'"),
        (_logger_set("lmcleaner.training", "propagate", "no"), "loggers.lmcleaner.training.propagate", "true/false"),
        (_logger_set("lmcleaner.training", "colour", "red"), "loggers.lmcleaner.training.colour", "unknown key"),
        (_top("handler", {}), "handler", "unknown top-level key"),
        (_top("version", 2), "version", "must be 1"),
        (lambda cfg: cfg["formatters"]["standard"].update(format="%(asctime"), "formatters.standard.format", "Invalid format"),
        (lambda cfg: cfg["filters"]["plain_messages"].update({"()": "nope.Filter"}), "filters.plain_messages.()", "cannot import"),
        # Only the handler's constructor sees this one (inside dictConfig): re-worded, not passed through.
        (_handler_set("training_csv", "queue_size", -1), "handlers.training_csv", "queue_size must be >= 0"),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(tmp_path: Path, mutate: Callable[[dict[str, Any]], None], key: str, detail: str) -> None:
    path = write_config(tmp_path, mutate)
    with pytest.raises(TelemetryConfigError) as info:
        telemetry.initialize(path, output_dir=tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message
    assert f"{key}: " in message, message
    assert detail in message, message
    assert str(path) in message
    assert not telemetry.is_initialized()


def test_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nhandlers:\n  console: [unclosed\n")
    with pytest.raises(TelemetryConfigError, match=r"invalid YAML at line \d+") as info:
        telemetry.initialize(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"output_dirr": "x"}, "output_dirr"), ({"logging_frequency": "2"}, "logging_frequency")],
)
def test_bad_overrides_name_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(TelemetryConfigError, match=rf"initialize\(\) override: {key}: "):
        telemetry.initialize(**overrides)


def test_failed_reinitialise_keeps_the_running_session(tmp_path: Path) -> None:
    good = telemetry.initialize(output_dir=tmp_path / "good")
    bad = write_config(tmp_path, _set("metrics", "nope", 1))
    with pytest.raises(TelemetryConfigError):
        telemetry.initialize(bad, output_dir=tmp_path / "bad")
    assert telemetry.current_session() is good
    telemetry.log_training_progress(1, {"loss": 0.5})
    telemetry.shutdown()
    _, rows = read_csv(tmp_path / "good" / "training.csv")
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "0.5")]
    assert not (tmp_path / "bad").exists()


def test_output_dir_precedence_override_env_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, _set("metrics", "output_dir", str(tmp_path / "from_yaml")))
    assert telemetry.initialize(path).output_dir == tmp_path / "from_yaml"
    monkeypatch.setenv("LMCLEANER_TELEMETRY_DIR", str(tmp_path / "from_env"))
    assert telemetry.initialize(path).output_dir == tmp_path / "from_env"
    session = telemetry.initialize(path, output_dir=tmp_path / "from_arg")
    assert session.output_dir == tmp_path / "from_arg"
    assert session.log_dir == tmp_path / "from_arg" / "logs"
    assert session.tensorboard_dir == tmp_path / "from_arg" / "tensorboard"


def test_config_path_from_env_and_relative_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["metrics"].update(output_dir=str(tmp_path / "o"), log_dir="text", tensorboard_dir=str(tmp_path / "tb"))

    monkeypatch.setenv("LMCLEANER_TELEMETRY_CONFIG", str(write_config(tmp_path, mutate)))
    session = telemetry.initialize()
    assert session.log_dir == tmp_path / "o" / "text"  # relative -> under output_dir
    assert session.tensorboard_dir == tmp_path / "tb"
    telemetry.get_model_logger().warning("hello")
    telemetry.shutdown()
    assert "hello" in (tmp_path / "o" / "text" / "lmcleaner.log").read_text()


def test_buffer_sizes_become_handler_defaults(tmp_path: Path) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["metrics"].update(queue_size=123, batch_size=7, flush_interval_s=0.25)
        cfg["handlers"]["metrics_csv"]["queue_size"] = 5  # an explicit value wins

    session = telemetry.initialize(write_config(tmp_path, mutate), output_dir=tmp_path)
    training_csv = session.handlers["training_csv"]
    assert isinstance(training_csv, BackgroundHandler)
    assert (training_csv.queue_size, training_csv.batch_size, training_csv.flush_interval_s) == (123, 7, 0.25)
    assert session.handlers["metrics_csv"].queue_size == 5  # type: ignore[attr-defined]
    assert session.handlers["tensorboard"].batch_size == 7  # type: ignore[attr-defined]
    assert session.settings.queue_size == 123


def test_propagate_from_yaml_is_honoured(tmp_path: Path) -> None:
    # Default: training records propagate to `lmcleaner`, whose text log gets them.
    telemetry.initialize(output_dir=tmp_path / "default")
    assert telemetry.get_training_logger().propagate is True
    telemetry.log_training_progress(1, {"loss": 0.5})
    telemetry.shutdown()
    assert "step 1: loss=0.5" in (tmp_path / "default" / "logs" / "lmcleaner.log").read_text()

    path = write_config(tmp_path, _logger_set("lmcleaner.training", "propagate", False))
    telemetry.initialize(path, output_dir=tmp_path / "noprop")
    assert telemetry.get_training_logger().propagate is False
    telemetry.log_training_progress(1, {"loss": 0.5})
    telemetry.get_model_logger().info("model message")
    telemetry.shutdown()
    text = (tmp_path / "noprop" / "logs" / "lmcleaner.log").read_text()
    assert "model message" in text
    assert "loss" not in text
    assert len(read_csv(tmp_path / "noprop" / "training.csv")[1]) == 1  # its own handler still runs


def test_getters_return_the_documented_names() -> None:
    assert telemetry.get_training_logger().name == "lmcleaner.training"
    assert telemetry.get_model_logger().name == "lmcleaner.model"
    assert telemetry.get_reward_logger().name == "lmcleaner.reward"
    assert telemetry.get_system_logger().name == "lmcleaner.system"
    assert telemetry.get_metrics_logger().name == "lmcleaner.metrics"
    assert isinstance(telemetry.get_training_logger(), logging.Logger)
