"""Loading and validating the telemetry YAML.

The file is a ``logging.config.dictConfig`` schema (``version: 1``) plus one
extra top-level section, ``metrics:``, holding what the stdlib schema has no
place for (output paths, logging frequencies, buffer sizes).

Why validate before handing the dict to the stdlib: ``dictConfig`` closes the
existing handlers *before* it discovers a typo, and its errors read
``Unable to configure handler 'x'`` with the real cause buried in a chained
traceback. Everything that can be checked up front is checked here, and every
problem is reported as a one-line :class:`TelemetryConfigError` that starts
with the dotted path of the offending key (``metrics.logging_frequency: ...``).

Paths: ``${output_dir}``, ``${log_dir}`` and ``${tensorboard_dir}`` in any
string under ``handlers:`` are replaced with the resolved directories.
Precedence for ``output_dir``: ``initialize(output_dir=...)`` >
``$LMCLEANER_TELEMETRY_DIR`` > the YAML > the built-in default. Relative
``log_dir`` / ``tensorboard_dir`` are taken relative to ``output_dir``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
import pkgutil
import string
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

CONFIG_ENV = "LMCLEANER_TELEMETRY_CONFIG"
OUTPUT_DIR_ENV = "LMCLEANER_TELEMETRY_DIR"
DEFAULT_CONFIG_NAME = "default_logging.yaml"

_DICTCONFIG_KEYS = {"version", "formatters", "filters", "handlers", "loggers", "root", "incremental", "disable_existing_loggers"}
_LOGGER_KEYS = {"level", "propagate", "filters", "handlers"}
_HANDLER_RESERVED = {"class", "()", "formatter", "level", "filters", "."}
_PLACEHOLDERS = ("output_dir", "log_dir", "tensorboard_dir")


class TelemetryConfigError(ValueError):
    """A telemetry configuration problem; the message is one line and names the key."""

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        self.key = key
        self.problem = " ".join(str(problem).split())  # always one line
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {self.problem}")


@dataclass(frozen=True)
class MetricsSettings:
    """The ``metrics:`` section, after defaults, env vars and overrides."""

    output_dir: str = "lmcleaner_out/telemetry"
    """Where CSV files go; also the base of ``log_dir`` / ``tensorboard_dir``."""
    log_dir: str | None = None
    """Text log directory (default ``<output_dir>/logs``)."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory (default ``<output_dir>/tensorboard``)."""
    logging_frequency: int = 1
    """``log_training_progress`` / ``TelemetryCallback.on_log`` keep every n-th."""
    validation_frequency: int = 1
    """``TelemetryCallback.on_evaluate`` keeps every n-th evaluation."""
    queue_size: int = 10_000
    """Records buffered per background handler before callers wait (0 = unbounded)."""
    batch_size: int = 1024
    """Most records per write; this many waiting also wakes the writer early."""
    flush_interval_s: float = 1.0
    """How often writer threads wake to write what is queued (rows lag at most this)."""
    resource_monitor_interval_s: float = 0.0
    """> 0 starts the resource monitor at ``initialize`` with this period."""

    def resolved_dirs(self) -> dict[str, Path]:
        """Absolute ``output_dir``, ``log_dir`` and ``tensorboard_dir``."""
        out = Path(self.output_dir).expanduser().absolute()

        def under_out(value: str | None, default: str) -> Path:
            p = Path(value).expanduser() if value else Path(default)
            return p if p.is_absolute() else out / p

        return {
            "output_dir": out,
            "log_dir": under_out(self.log_dir, "logs"),
            "tensorboard_dir": under_out(self.tensorboard_dir, "tensorboard"),
        }


# field -> (accepted types, minimum or None, type name for messages)
_FIELD_RULES: dict[str, tuple[tuple[type, ...], float | None, str, bool]] = {
    "output_dir": ((str, os.PathLike), None, "a path string", False),
    "log_dir": ((str, os.PathLike), None, "a path string or null", True),
    "tensorboard_dir": ((str, os.PathLike), None, "a path string or null", True),
    "logging_frequency": ((int,), 1, "an integer >= 1", False),
    "validation_frequency": ((int,), 1, "an integer >= 1", False),
    "queue_size": ((int,), 0, "an integer >= 0", False),
    "batch_size": ((int,), 1, "an integer >= 1", False),
    "flush_interval_s": ((int, float), 0.001, "a number > 0", False),
    "resource_monitor_interval_s": ((int, float), 0, "a number >= 0", False),
}
assert set(_FIELD_RULES) == {f.name for f in dataclasses.fields(MetricsSettings)}


def default_config_path() -> Path:
    """The YAML shipped with the package."""
    return Path(str(resources.files(__package__).joinpath(DEFAULT_CONFIG_NAME)))


def _check_metric_value(key: str, value: Any, source: str | None, where: str) -> Any:
    if key not in _FIELD_RULES:
        allowed = ", ".join(sorted(_FIELD_RULES))
        raise TelemetryConfigError(f"{where}{key}", f"unknown key (expected one of: {allowed})", source)
    types, minimum, expected, nullable = _FIELD_RULES[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, types):
        raise TelemetryConfigError(f"{where}{key}", f"expected {expected}, got {type(value).__name__} {value!r}", source)
    if minimum is not None and value < minimum:
        raise TelemetryConfigError(f"{where}{key}", f"expected {expected}, got {value!r}", source)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return value


def parse_metrics_section(
    section: Any, overrides: Mapping[str, Any] | None = None, source: str | None = None
) -> MetricsSettings:
    """Validate ``metrics:`` and apply ``$LMCLEANER_TELEMETRY_DIR`` and overrides."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise TelemetryConfigError("metrics", f"expected a mapping, got {type(section).__name__}", source)
    values: dict[str, Any] = {}
    for key, value in section.items():
        values[key] = _check_metric_value(str(key), value, source, "metrics.")
    env_dir = os.environ.get(OUTPUT_DIR_ENV)
    if env_dir:
        values["output_dir"] = env_dir
    for key, value in (overrides or {}).items():
        values[key] = _check_metric_value(str(key), value, "initialize() override", "")
    return MetricsSettings(**values)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the YAML file; syntax errors become one-line config errors."""
    source = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise TelemetryConfigError("config_path", f"file not found: {source}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TelemetryConfigError("yaml", f"invalid YAML{at}: {problem}", source) from None
    if not isinstance(data, dict):
        raise TelemetryConfigError("<top level>", f"expected a mapping, got {type(data).__name__}", source)
    return data


def _check_level(key: str, level: Any, source: str | None) -> None:
    if isinstance(level, int) and not isinstance(level, bool):
        return
    if isinstance(level, str) and level.upper() in logging.getLevelNamesMapping():
        return
    raise TelemetryConfigError(key, f"unknown level {level!r}", source)


def _section(cfg: Mapping[str, Any], name: str, source: str | None) -> Mapping[str, Any]:
    section = cfg.get(name) or {}
    if not isinstance(section, Mapping):
        raise TelemetryConfigError(name, f"expected a mapping, got {type(section).__name__}", source)
    for entry, body in section.items():
        if not isinstance(body, Mapping):
            raise TelemetryConfigError(f"{name}.{entry}", f"expected a mapping, got {type(body).__name__}", source)
    return section


def _resolve(key: str, cname: Any, source: str | None) -> Any:
    """Import a dotted name, or raise a config error naming ``key``."""
    if not isinstance(cname, str) or not cname:
        raise TelemetryConfigError(key, f"expected a dotted class name, got {cname!r}", source)
    try:
        return pkgutil.resolve_name(cname)
    except Exception as exc:
        raise TelemetryConfigError(key, f"cannot import {cname!r} ({type(exc).__name__}: {exc})", source) from None


def _validate_formatter(key: str, body: Mapping[str, Any], source: str | None) -> None:
    """Import custom formatter classes; build plain ones to check the format string."""
    for special in ("()", "class"):
        if special in body:
            _resolve(f"{key}.{special}", body[special], source)
            return
    try:
        logging.Formatter(
            body.get("format"), body.get("datefmt"), style=body.get("style", "%"), validate=body.get("validate", True)
        )
    except (ValueError, TypeError) as exc:
        raise TelemetryConfigError(f"{key}.format", str(exc), source) from None


def resolve_handler_class(key: str, cname: Any, source: str | None) -> type:
    """Import a handler ``class:`` and check it is a ``logging.Handler``."""
    klass = _resolve(key, cname, source)
    if not (isinstance(klass, type) and issubclass(klass, logging.Handler)):
        raise TelemetryConfigError(key, f"{cname!r} is not a logging.Handler subclass", source)
    return klass


def _validate_logger(key: str, body: Mapping[str, Any], handlers: Mapping[str, Any], filters: Mapping[str, Any], source: str | None) -> None:
    for k in body:
        if k not in _LOGGER_KEYS:
            raise TelemetryConfigError(f"{key}.{k}", f"unknown key (expected one of: {', '.join(sorted(_LOGGER_KEYS))})", source)
    if "level" in body:
        _check_level(f"{key}.level", body["level"], source)
    if "propagate" in body and not isinstance(body["propagate"], bool):
        raise TelemetryConfigError(f"{key}.propagate", f"expected true/false, got {body['propagate']!r}", source)
    for ref_key, known in (("handlers", handlers), ("filters", filters)):
        refs = body.get(ref_key) or []
        if not isinstance(refs, list):
            raise TelemetryConfigError(f"{key}.{ref_key}", f"expected a list, got {type(refs).__name__}", source)
        for ref in refs:
            if isinstance(ref, str) and ref not in known:
                raise TelemetryConfigError(f"{key}.{ref_key}", f"{ref!r} is not defined under {ref_key}:", source)


def validate_dict_config(cfg: Mapping[str, Any], source: str | None = None) -> None:
    """Check the stdlib part of the YAML (everything except ``metrics:``)."""
    for key in cfg:
        if key not in _DICTCONFIG_KEYS and key != "metrics":
            allowed = ", ".join(sorted(_DICTCONFIG_KEYS | {"metrics"}))
            raise TelemetryConfigError(str(key), f"unknown top-level key (expected one of: {allowed})", source)
    if cfg.get("version") != 1:
        raise TelemetryConfigError("version", f"must be 1 (the dictConfig schema version), got {cfg.get('version')!r}", source)
    if cfg.get("incremental"):
        raise TelemetryConfigError("incremental", "incremental configs are not supported by initialize()", source)
    formatters = _section(cfg, "formatters", source)
    filters = _section(cfg, "filters", source)
    handlers = _section(cfg, "handlers", source)
    loggers = _section(cfg, "loggers", source)
    for name, body in formatters.items():
        _validate_formatter(f"formatters.{name}", body, source)
    for name, body in filters.items():
        if "()" in body and isinstance(body["()"], str):
            _resolve(f"filters.{name}.()", body["()"], source)
    for name, body in handlers.items():
        key = f"handlers.{name}"
        if "()" in body:
            continue  # factory handlers: arbitrary signature, left to dictConfig
        if "class" not in body:
            raise TelemetryConfigError(f"{key}.class", "missing", source)
        klass = resolve_handler_class(f"{key}.class", body["class"], source)
        if "level" in body:
            _check_level(f"{key}.level", body["level"], source)
        fmt = body.get("formatter")
        if fmt is not None and fmt not in formatters:
            raise TelemetryConfigError(f"{key}.formatter", f"{fmt!r} is not defined under formatters:", source)
        for flt in body.get("filters") or []:
            if isinstance(flt, str) and flt not in filters:
                raise TelemetryConfigError(f"{key}.filters", f"{flt!r} is not defined under filters:", source)
        kwargs = {k: v for k, v in body.items() if k not in _HANDLER_RESERVED}
        try:
            signature = inspect.signature(klass)
        except (TypeError, ValueError):
            continue
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            unknown = [k for k in kwargs if k not in signature.parameters]
            if unknown and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
                raise TelemetryConfigError(f"{key}.{unknown[0]}", f"not an argument of {body['class']}", source) from None
            raise TelemetryConfigError(key, f"bad arguments for {body['class']}: {exc}", source) from None
    for name, body in loggers.items():
        _validate_logger(f"loggers.{name}", body, handlers, filters, source)
    if "root" in cfg:
        root = cfg["root"]
        if not isinstance(root, Mapping):
            raise TelemetryConfigError("root", f"expected a mapping, got {type(root).__name__}", source)
        _validate_logger("root", root, handlers, filters, source)


def _substitute(value: Any, mapping: Mapping[str, str], key: str, source: str | None) -> Any:
    if isinstance(value, str) and "$" in value:
        try:
            return string.Template(value).substitute(mapping)
        except (KeyError, ValueError) as exc:
            raise TelemetryConfigError(key, f"bad placeholder in {value!r} ({exc}); known: " + ", ".join(f"${{{p}}}" for p in _PLACEHOLDERS), source) from None
    if isinstance(value, Mapping):
        return {k: _substitute(v, mapping, f"{key}.{k}", source) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, mapping, f"{key}[{i}]", source) for i, v in enumerate(value)]
    return value


def build_dict_config(raw: Mapping[str, Any], settings: MetricsSettings, source: str | None = None) -> dict[str, Any]:
    """The dict to hand to ``dictConfig``: placeholders filled, buffer sizes injected.

    ``queue_size`` / ``batch_size`` / ``flush_interval_s`` from ``metrics:``
    become the defaults of every lmcleaner background handler that does not
    set its own.
    """
    from .background import BackgroundHandler

    cfg = copy.deepcopy({k: v for k, v in raw.items() if k != "metrics"})
    dirs = {k: str(v) for k, v in settings.resolved_dirs().items()}
    handlers = cfg.get("handlers") or {}
    for name in list(handlers):
        body = _substitute(handlers[name], dirs, f"handlers.{name}", source)
        if "class" in body:
            klass = resolve_handler_class(f"handlers.{name}.class", body["class"], source)
            if issubclass(klass, BackgroundHandler):
                body.setdefault("queue_size", settings.queue_size)
                body.setdefault("batch_size", settings.batch_size)
                body.setdefault("flush_interval_s", settings.flush_interval_s)
        handlers[name] = body
    return cfg


def load(config_path: str | os.PathLike[str] | None, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], MetricsSettings, str]:
    """Read, validate and resolve a telemetry YAML.

    Returns the ``dictConfig`` dict, the metrics settings and the path used.
    """
    path = config_path or os.environ.get(CONFIG_ENV) or default_config_path()
    source = str(path)
    raw = read_yaml(path)
    validate_dict_config(raw, source)
    settings = parse_metrics_section(raw.get("metrics"), overrides, source)
    return build_dict_config(raw, settings, source), settings, source
