"""benchmarks/batched.py on a micro run: requests answered jointly, per-request costs as ratios
to one request's replay, the joint replay exact against the joint oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_batched_requests_table(tmp_path):
    out = tmp_path / "b.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "batched.py"), "--model", "micro-llama", "--init", "scratch",
           "--steps", "40", "--C", "10", "--ks", "1,3", "--methods", "replay", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert len(doc["requests"]) == 3
    rows = {(r["k"], r["method"]): r for r in doc["rows"]}
    assert set(rows) == {(1, "replay"), (3, "replay")}
    assert rows[(1, "replay")]["per_request_vs_single_replay"] == 1
    for r in rows.values():  # replay is exact against the joint oracle (retraining without all k)
        assert r["rel_param_error"] == 0 and r["uses"] == r["k"]
    # three requests cost one replay from the earliest use: at most a restore interval more than one
    joint = rows[(3, "replay")]
    assert joint["grad_equivalents"] <= rows[(1, "replay")]["grad_equivalents"] + 10
    assert joint["per_request_vs_single_replay"] == pytest.approx(joint["grad_equivalents"] / 3
                                                                 / rows[(1, "replay")]["grad_equivalents"])


def test_batched_rejects_bad_ks(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "batched.py"), "--ks", "0,2"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "--ks" in proc.stderr
