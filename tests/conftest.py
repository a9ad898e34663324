"""Shared fixtures: tiny, fast configs on the embedded data and model."""

from __future__ import annotations

import pytest

from lmcleaner.config import load_config

FAST = [
    "model=micro-llama",
    "training.num_samples=48",
    "training.batch_size=4",
    "training.max_steps=12",
    "training.progress_bar=false",
    "training.logging_steps=0",
    "training_logger.enabled=false",
]


def tiny_config(tmp_path, *overrides: str):
    return load_config(overrides=[*FAST, f"training.output_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture
def make_config(tmp_path):
    return lambda *o: tiny_config(tmp_path, *o)
