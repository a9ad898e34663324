"""``initialize()`` / ``flush()`` / ``shutdown()``: the one telemetry session.

Why a process-wide session: the stdlib logging tree is process-wide, so the
handlers configured from the YAML are too. The session remembers which
handlers and loggers it configured so that

* re-initialising first flushes and closes the previous handlers (no record
  lost, no handler attached twice, no duplicated rows);
* ``shutdown()`` (also run at exit) flushes everything, detaches the handlers
  and returns the loggers to plain stdlib behaviour, after which the helpers
  keep working as plain logging calls.

Note: ``dictConfig`` itself flushes and closes every handler created earlier
in the process (stdlib behaviour for non-incremental configs). Stream handlers
keep working afterwards and stdlib ``FileHandler``\\ s reopen on their next
write, but handlers of your own that cannot reopen should be created after
``initialize()``.
"""

from __future__ import annotations

import atexit
import logging
import logging.config
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MetricsSettings, TelemetryConfigError, load
from .names import SYSTEM_LOGGER

_lock = threading.RLock()


@dataclass
class TelemetrySession:
    """What ``initialize()`` set up; returned to the caller for inspection."""

    settings: MetricsSettings
    config_path: str
    dirs: dict[str, Path]
    handlers: dict[str, logging.Handler] = field(default_factory=dict)
    logger_names: list[str] = field(default_factory=list)
    configures_root: bool = False

    @property
    def output_dir(self) -> Path:
        return self.dirs["output_dir"]

    @property
    def log_dir(self) -> Path:
        return self.dirs["log_dir"]

    @property
    def tensorboard_dir(self) -> Path:
        return self.dirs["tensorboard_dir"]


_session: TelemetrySession | None = None

_DICTCONFIG_ERROR = re.compile(r"Unable to configure (handler|formatter|filter|logger) '(.+?)'")


def _one_line_dictconfig_error(exc: Exception, source: str) -> TelemetryConfigError:
    """Turn dictConfig's chained ``Unable to configure ...`` into ``section.name: cause``."""
    text = str(exc)
    match = _DICTCONFIG_ERROR.search(text)
    if match:
        key = f"{match.group(1)}s.{match.group(2)}"
    elif "root" in text:
        key = "root"
    else:
        key = "<config>"
    causes = []
    cause = exc.__cause__
    while cause is not None:
        causes.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__
    return TelemetryConfigError(key, "; ".join(causes) or text, source)


def _logger(name: str) -> logging.Logger:
    return logging.getLogger() if name == "" else logging.getLogger(name)


def _detach(session: TelemetrySession) -> None:
    """Flush, detach and close the session's handlers; reset its loggers."""
    handlers = list(session.handlers.values())
    for handler in handlers:
        try:
            handler.flush()
        except Exception:
            pass
    names = list(session.logger_names) + ([""] if session.configures_root else [])
    for name in names:
        logger = _logger(name)
        for handler in handlers:
            logger.removeHandler(handler)
        if name:
            logger.setLevel(logging.NOTSET)
            logger.propagate = True
    for handler in handlers:
        try:
            handler.close()
        except Exception:
            pass


def initialize(config_path: str | os.PathLike[str] | None = None, **overrides: Any) -> TelemetrySession:
    """Configure all lmcleaner logging from one YAML file.

    Args:
        config_path: a dictConfig YAML with a ``metrics:`` section; default
            ``$LMCLEANER_TELEMETRY_CONFIG``, else the packaged
            ``default_logging.yaml``.
        **overrides: values for the ``metrics:`` section, e.g.
            ``output_dir=tmp_path, logging_frequency=10``.

    The YAML is validated before anything is changed (keys, types, handler
    classes and their arguments, references, format strings), so a bad
    config raises :class:`TelemetryConfigError` and leaves the running
    session untouched. Errors only a handler's constructor can see (say, an
    invalid value) surface from inside ``dictConfig``; they are re-worded the
    same way, but the previous session is closed by then. Calling
    ``initialize`` again replaces the previous session (its records are
    flushed first).

    Returns the :class:`TelemetrySession` (resolved directories, handlers).
    """
    from .resources import start_resource_monitor, stop_resource_monitor

    dict_config, settings, source = load(config_path, overrides)
    global _session
    with _lock:
        stop_resource_monitor()
        if _session is not None:
            _detach(_session)
            _session = None
        # Same as logging.config.dictConfig(dict_config), keeping the
        # configurator so the created handler objects are known afterwards.
        configurator = logging.config.dictConfigClass(dict_config)
        try:
            configurator.configure()
        except Exception as exc:
            created = {n: h for n, h in (configurator.config.get("handlers") or {}).items() if isinstance(h, logging.Handler)}
            _detach(TelemetrySession(settings, source, {}, created, list(dict_config.get("loggers") or {}), "root" in dict_config))
            raise _one_line_dictconfig_error(exc, source) from exc
        handlers = {n: h for n, h in (configurator.config.get("handlers") or {}).items() if isinstance(h, logging.Handler)}
        _session = TelemetrySession(
            settings=settings,
            config_path=source,
            dirs=settings.resolved_dirs(),
            handlers=handlers,
            logger_names=list(dict_config.get("loggers") or {}),
            configures_root="root" in dict_config,
        )
        session = _session
    if settings.resource_monitor_interval_s > 0:
        start_resource_monitor(settings.resource_monitor_interval_s)
    logging.getLogger(SYSTEM_LOGGER).info(
        "telemetry initialised from %s; output_dir=%s", source, session.output_dir
    )
    return session


def flush() -> None:
    """Block until every record logged so far is written (CSV, TensorBoard, text log)."""
    with _lock:
        handlers = list(_session.handlers.values()) if _session is not None else []
    for handler in handlers:
        handler.flush()


def shutdown() -> None:
    """Stop the resource monitor, flush and close all telemetry handlers.

    Idempotent; registered with ``atexit``. Afterwards the helpers log through
    plain stdlib logging again.
    """
    from .resources import stop_resource_monitor

    global _session
    stop_resource_monitor()
    with _lock:
        if _session is not None:
            _detach(_session)
            _session = None


def is_initialized() -> bool:
    """Whether a telemetry session is active."""
    return _session is not None


def current_session() -> TelemetrySession | None:
    """The active session, or ``None``."""
    return _session


def current_settings() -> MetricsSettings | None:
    """The active ``metrics:`` settings, or ``None`` when not initialised."""
    session = _session
    return session.settings if session is not None else None


atexit.register(shutdown)

__all__ = [
    "TelemetrySession",
    "TelemetryConfigError",
    "initialize",
    "flush",
    "shutdown",
    "is_initialized",
    "current_session",
    "current_settings",
]
