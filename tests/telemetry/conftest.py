"""Shared fixtures: every test gets a clean logging state and its own directory."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcleaner import telemetry


@pytest.fixture(autouse=True)
def _no_leftover_session(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees (or leaves behind) an active session or env overrides."""
    monkeypatch.delenv("LMCLEANER_TELEMETRY_DIR", raising=False)
    monkeypatch.delenv("LMCLEANER_TELEMETRY_CONFIG", raising=False)
    telemetry.shutdown()
    yield
    telemetry.shutdown()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[telemetry.TelemetrySession]:
    """An initialised default-config session writing under ``tmp_path/out``."""
    s = telemetry.initialize(output_dir=tmp_path / "out")
    yield s
    telemetry.shutdown()


@pytest.fixture
def isolated_logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    """A logger outside ``lmcleaner.*`` with no handlers, removed again afterwards."""
    logger = logging.getLogger(f"tests.telemetry.{request.node.name}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
