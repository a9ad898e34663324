"""lmcleaner telemetry: one YAML-configured logging system for the whole library.

Usable on its own in any training script (it imports nothing else from
lmcleaner)::

    from lmcleaner import telemetry

    telemetry.initialize(output_dir="runs/exp1")       # default YAML
    for step, batch in enumerate(loader):
        ...
        telemetry.log_training_progress(step, {"loss": loss.item(), "lr": lr})
    telemetry.shutdown()                                  # also runs at exit

Metric records use ``extra={"metrics": {...}, "step": n}`` (see
:mod:`lmcleaner.telemetry.records`). ``TelemetryCallback`` is imported lazily
because it pulls in ``transformers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .background import BackgroundHandler
from .config import MetricsSettings, TelemetryConfigError, default_config_path
from .csv_handler import CSVHandler
from .names import (
    METRICS_LOGGER,
    MODEL_LOGGER,
    MODEL_OUTPUTS_LOGGER,
    REWARD_LOGGER,
    ROOT_LOGGER,
    SYSTEM_LOGGER,
    TRAINING_LOGGER,
    get_metrics_logger,
    get_model_logger,
    get_reward_logger,
    get_system_logger,
    get_training_logger,
)
from .progress import PlainProgress, log_model_output, log_training_progress, progress_bar
from .protocol import LoggingMetricLogger, MetricLogger, NullMetricLogger
from .records import MetricRecordsFilter, PlainMessagesFilter, emit_metrics
from .resources import (
    ResourceMonitor,
    log_memory_usage,
    sample_resources,
    start_resource_monitor,
    stop_resource_monitor,
)
from .rewards import log_reward_metrics, reward_statistics, wrap_reward_function, wrap_reward_functions
from .session import (
    TelemetrySession,
    current_session,
    current_settings,
    flush,
    initialize,
    is_initialized,
    shutdown,
)
from .tensorboard_handler import TensorBoardHandler
from .text_handler import BackgroundFileHandler

if TYPE_CHECKING:
    from .callback import TelemetryCallback


def __getattr__(name: str) -> Any:
    if name == "TelemetryCallback":
        from .callback import TelemetryCallback

        return TelemetryCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # session
    "initialize",
    "flush",
    "shutdown",
    "is_initialized",
    "current_session",
    "current_settings",
    "TelemetrySession",
    "MetricsSettings",
    "TelemetryConfigError",
    "default_config_path",
    # loggers
    "ROOT_LOGGER",
    "TRAINING_LOGGER",
    "MODEL_LOGGER",
    "MODEL_OUTPUTS_LOGGER",
    "REWARD_LOGGER",
    "SYSTEM_LOGGER",
    "METRICS_LOGGER",
    "get_training_logger",
    "get_model_logger",
    "get_reward_logger",
    "get_system_logger",
    "get_metrics_logger",
    # helpers
    "log_training_progress",
    "log_model_output",
    "progress_bar",
    "PlainProgress",
    "log_memory_usage",
    "sample_resources",
    "ResourceMonitor",
    "start_resource_monitor",
    "stop_resource_monitor",
    "log_reward_metrics",
    "reward_statistics",
    "wrap_reward_function",
    "wrap_reward_functions",
    "emit_metrics",
    "TelemetryCallback",
    # handlers and filters
    "BackgroundHandler",
    "CSVHandler",
    "TensorBoardHandler",
    "BackgroundFileHandler",
    "PlainMessagesFilter",
    "MetricRecordsFilter",
    # protocol
    "MetricLogger",
    "LoggingMetricLogger",
    "NullMetricLogger",
]
