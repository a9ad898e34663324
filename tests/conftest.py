"""Shared fixtures: tiny, fast configs on the embedded data and model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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


def torchrun(script: Path, args: list[str], port: int, timeout: int = 400) -> str:
    """Run ``script`` on two CPU ranks (``torchrun``, gloo); returns stderr.

    The launch gets its own process group, so a hang (ranks disagreeing on a
    collective or a barrier) kills every rank instead of the test session."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{Path(script).name} under torchrun hung")
    assert proc.returncode == 0, err[-4000:]
    return err
