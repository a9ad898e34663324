"""Memory / CPU / GPU usage: one-off samples and a periodic monitor thread.

Sources, each used only when present:

* ``psutil``: process RSS and CPU %, system memory;
* ``torch.cuda`` (only if torch is already imported and CUDA is available):
  allocated / peak / reserved memory per device;
* NVML through ``pynvml`` (package ``nvidia-ml-py``, optional extra
  ``lmcleaner[nvml]``): device utilisation and memory as the driver sees it,
  which includes other processes.

Samples go to the ``lmcleaner.system`` logger as metric records (``system.csv``
and TensorBoard ``system/*`` with the default YAML) and are returned as a dict.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import psutil

from .names import SYSTEM_LOGGER
from .records import emit_metrics

_MB = 1024.0 * 1024.0
_process_lock = threading.Lock()
_process: psutil.Process | None = None
_nvml_state: dict[str, Any] = {"tried": False, "module": None}


def _this_process() -> psutil.Process:
    """One cached ``Process``: ``cpu_percent`` measures since its previous call."""
    global _process
    with _process_lock:
        if _process is None:
            _process = psutil.Process()
            _process.cpu_percent(None)  # prime: the first call always returns 0.0
        return _process


def _nvml() -> Any:
    """``pynvml`` initialised once, or ``None`` when it is not installed / no driver."""
    if not _nvml_state["tried"]:
        _nvml_state["tried"] = True
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            _nvml_state["module"] = pynvml
        except Exception:
            _nvml_state["module"] = None
    return _nvml_state["module"]


def sample_resources() -> dict[str, float]:
    """Current resource usage as ``{name: value}`` (MB, percent)."""
    proc = _this_process()
    with proc.oneshot():
        rss = proc.memory_info().rss
        cpu = proc.cpu_percent(None)
    vm = psutil.virtual_memory()
    stats: dict[str, float] = {
        "rss_mb": rss / _MB,
        "cpu_percent": float(cpu),
        "system_memory_percent": float(vm.percent),
        "system_memory_available_mb": vm.available / _MB,
    }
    # Only look at CUDA when the program already uses torch: importing torch
    # just to report "no GPU" would cost seconds in a torch-free script.
    # (getattr: another thread may be half-way through importing torch.)
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    try:
        if cuda is not None and cuda.is_available():
            for i in range(cuda.device_count()):
                stats[f"cuda{i}_allocated_mb"] = cuda.memory_allocated(i) / _MB
                stats[f"cuda{i}_max_allocated_mb"] = cuda.max_memory_allocated(i) / _MB
                stats[f"cuda{i}_reserved_mb"] = cuda.memory_reserved(i) / _MB
    except Exception:  # CUDA init errors must not break a memory report
        pass
    nvml = _nvml()
    if nvml is not None:
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                stats[f"gpu{i}_util_percent"] = float(util.gpu)
                stats[f"gpu{i}_memory_used_mb"] = mem.used / _MB
                stats[f"gpu{i}_memory_total_mb"] = mem.total / _MB
        except Exception:  # driver hiccup: keep the psutil/torch numbers
            pass
    return stats


def log_memory_usage(step: int | None = None) -> dict[str, float]:
    """Sample resource usage, log it to ``lmcleaner.system`` and return it."""
    stats = sample_resources()
    emit_metrics(logging.getLogger(SYSTEM_LOGGER), stats, step=step, message="resources")
    return stats


class ResourceMonitor:
    """Daemon thread calling :func:`log_memory_usage` every ``interval_s`` seconds.

    Daemon so a forgotten monitor never keeps the interpreter alive;
    ``shutdown()`` stops it. Samples are numbered 0, 1, 2, ... as their step.
    """

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = float(interval_s)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmcleaner-telemetry-resources", daemon=True)

    def start(self) -> "ResourceMonitor":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                log_memory_usage(step=self.samples)
            except Exception:
                logging.getLogger(SYSTEM_LOGGER).debug("resource sample failed", exc_info=True)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


_monitor_lock = threading.Lock()
_monitor: ResourceMonitor | None = None


def start_resource_monitor(interval_s: float = 30.0) -> ResourceMonitor:
    """Start (or restart with a new interval) the process-wide resource monitor."""
    global _monitor
    with _monitor_lock:
        if _monitor is not None:
            _monitor.stop()
        _monitor = ResourceMonitor(interval_s).start()
        return _monitor


def stop_resource_monitor() -> None:
    """Stop the resource monitor if one is running (no-op otherwise)."""
    global _monitor
    with _monitor_lock:
        monitor, _monitor = _monitor, None
    if monitor is not None:
        monitor.stop()
