"""benchmarks/gpu_check.sh in its CPU smoke mode: every phase runs and the JSON holds the numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "LMCLEANER_GPU_CHECK_SMOKE": "1", "OUT": str(tmp_path / "out"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert doc["mode"] == "smoke"
    assert not [k for k, v in doc.items() if isinstance(v, dict) and "error" in v]
    train, hvp, unlearn = doc["train"], doc["hvp"], doc["unlearn"]
    assert train["tokens_per_s"] > 0 and train["steps"] == 12
    assert abs(train["checkpoint_bytes_planned"] / train["checkpoint_bytes"] - 1) < 0.1
    assert 0.5 < hvp["exact_hvp_over_grad"] < 20 and hvp["GGN_hvp_over_grad"] > 0
    assert len(unlearn["forget_ids"]) == 4
    assert unlearn["replay"]["grad_equivalents"] > 0 and unlearn["lmcleaner"]["grad_equivalents"] > 0
    assert math.isfinite(unlearn["lmcleaner"]["rel_error"]) and unlearn["lmcleaner"]["rel_error"] < 1.0
    assert doc["retrain"]["replay_equals_retrain"] is True
