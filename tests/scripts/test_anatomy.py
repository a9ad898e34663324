"""benchmarks/anatomy.py on a micro run: the exact deviation it records obeys the row-sum
identity of softmax cross-entropy (SGD never moves the common shift of the output rows;
AdamW's per-coordinate scaling does), and its carry table is measured against that deviation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _anatomy(tmp_path, optimizer: str, *extra: str) -> dict:
    out = tmp_path / f"{optimizer}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "anatomy.py"), "--model", "micro-llama", "--init", "scratch",
           "--optimizer", optimizer, "--steps", "40", "--C", "10", "--forget", "2", "--json", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_anatomy_row_sum_identity_and_carries(tmp_path):
    sgd = _anatomy(tmp_path, "sgd", "--linearity", "10,30", "--fd-eps", "0.01")
    adamw = _anatomy(tmp_path, "adamw")
    # rows of the lm_head gradient sum to zero: under SGD the deviation has no common shift
    assert sgd["anatomy"]["common_shift_share"] < 1e-8
    assert adamw["anatomy"]["common_shift_share"] > 0.05
    for doc in (sgd, adamw):
        a = doc["anatomy"]
        assert 0 < a["head_energy_share"] <= 1 and 0 < a["rank1_share"] <= 1
        assert a["untargeted_rows"] < a["vocab"]
        dev = doc["development"]
        assert dev[-1]["cos_to_final"] == pytest.approx(1.0)
        carries = doc["carries"]
        assert [r["w"] for r in carries] == [r["step"] for r in dev[:-1]]
        # from the last checkpoint before tau every carry is close to the exact deviation
        assert carries[-1]["frozen"] < carries[0]["frozen"]
        # the oracle bounds replace entries of the frozen carry by exact ones: each can only lower
        # the error (a sum of squares over entries), the whole output layer most
        for r in carries:
            assert r["frozen_exact_head"] <= r["frozen_exact_untargeted"] + 1e-12 <= r["frozen"] + 2e-12, r
        assert carries[0]["frozen_exact_head"] < carries[0]["frozen"]
    assert all(r["adam_state"] is not None for r in adamw["carries"])
    assert all(r["adam_state"] is None for r in sgd["carries"])

    # --linearity: for SGD, LMCleaner's linear propagation from w *is* the flow's tangent at the
    # recorded trajectory, which the benchmark measures independently by finite differences of
    # exact replays: the two must agree (an exact check of the propagation, and of the benchmark)
    lin = sgd["linearity"]
    assert [r["w"] for r in lin] == [10, 30]
    for r in lin:
        assert r["linear_propagation"] == pytest.approx(r["tangent_at_recorded"], rel=0.05, abs=5e-3), r
        assert 0 < r["eps_response"] < 10
    # over the last 10 steps the flow is close to linear: every tangent is near the secant
    assert max(lin[-1]["tangent_at_recorded"], lin[-1]["tangent_at_midpoint"],
               lin[-1]["tangent_at_counterfactual"]) < 0.2, lin[-1]


def test_anatomy_linearity_rejects_a_window_end_that_is_not_a_restore_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "anatomy.py"), "--model", "micro-llama", "--init", "scratch",
           "--steps", "20", "--C", "10", "--forget", "1", "--linearity", "7", "--json", str(tmp_path / "a.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 2 and "--linearity" in proc.stderr and "restore points" in proc.stderr
    assert not (tmp_path / "a.json").exists()


def test_block_diagonal_backend_is_the_exact_hessian_without_cross_tensor_blocks():
    """``--block-bound``'s curvature (the bound of any per-layer approximation such as K-FAC):
    against the explicit Hessian of a tiny model with every cross-tensor block zeroed."""
    import importlib.util

    import torch

    from lmcleaner.unlearn import make_hvp_backend
    from lmcleaner.unlearn.hvp import BACKENDS
    from tests.unlearn.test_unlearn_hvp import _hessian, _problem
    from tests.unlearn.unlearn_harness import TinyMLPLM

    try:
        spec = importlib.util.spec_from_file_location("lmcleaner_bench_anatomy", ROOT / "benchmarks" / "anatomy.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # registers hessian_mode=block_diagonal
        torch.manual_seed(0)
        fl, params, batches, N, unflat, flat, flat0, V = _problem(TinyMLPLM(vocab=12, dim=4, hidden=6), 12)
        H = _hessian(fl, batches, N, unflat, flat0)
        sizes = [params[n].numel() for n in params]
        mask = torch.block_diag(*[torch.ones(s, s) for s in sizes])
        want = (V @ (H * mask).T)
        backend = make_hvp_backend("block_diagonal", fl)
        assert backend.evaluates_where_asked
        got = flat(backend.hvp(params, batches, N, unflat(V)))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), float((got - want).abs().max())
        # the cross-tensor blocks are not zero for this model: the bound drops real curvature
        assert float((H * (1 - mask)).abs().max()) > 1e-3
        assert backend.cost_in_grads == pytest.approx(len(sizes) * backend.exact.cost_in_grads)
    finally:
        BACKENDS.pop("block_diagonal", None)  # registered by the benchmark, for this test only
