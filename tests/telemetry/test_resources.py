"""log_memory_usage and the periodic resource monitor."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

from lmcleaner import telemetry

from ._helpers import read_csv


def test_memory_usage_values_are_real(session: telemetry.TelemetrySession) -> None:
    stats = telemetry.log_memory_usage(step=2)
    rss_now = psutil.Process().memory_info().rss / 2**20
    assert abs(stats["rss_mb"] - rss_now) < 0.5 * rss_now
    assert 0 < stats["system_memory_percent"] <= 100
    assert stats["system_memory_available_mb"] > 0
    assert stats["cpu_percent"] >= 0
    telemetry.shutdown()
    header, rows = read_csv(session.output_dir / "system.csv")
    assert {"rss_mb", "cpu_percent", "system_memory_percent", "system_memory_available_mb"} <= set(header)
    assert rows[0]["step"] == "2"
    assert float(rows[0]["rss_mb"]) == stats["rss_mb"]


def _wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_monitor_samples_periodically_and_stops(session: telemetry.TelemetrySession) -> None:
    monitor = telemetry.start_resource_monitor(0.02)
    assert monitor._thread.daemon
    assert _wait_for(lambda: monitor.samples >= 3)
    telemetry.stop_resource_monitor()
    assert not monitor.running
    stopped_at = monitor.samples
    time.sleep(0.1)
    assert monitor.samples == stopped_at
    telemetry.shutdown()
    _, rows = read_csv(session.output_dir / "system.csv")
    assert [int(r["step"]) for r in rows] == list(range(stopped_at))


def test_shutdown_stops_the_monitor(tmp_path: Path) -> None:
    session = telemetry.initialize(output_dir=tmp_path, resource_monitor_interval_s=0.02)
    csv_path = session.output_dir / "system.csv"

    def sampled() -> bool:
        telemetry.flush()
        return csv_path.exists() and len(read_csv(csv_path)[1]) >= 2

    assert _wait_for(sampled)
    telemetry.shutdown()
    assert [t for t in threading.enumerate() if t.name == "lmcleaner-telemetry-resources"] == []
    assert len(read_csv(session.output_dir / "system.csv")[1]) >= 1


def test_restarting_replaces_the_monitor(session: telemetry.TelemetrySession) -> None:
    first = telemetry.start_resource_monitor(10.0)
    second = telemetry.start_resource_monitor(10.0)
    assert not first.running and second.running
    telemetry.stop_resource_monitor()
    assert not second.running
