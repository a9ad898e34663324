"""Recording a real two-rank run (torchrun, gloo): rank 0 writes the global batches,
heavy mode stores every rank's micro-batches, and a single-process replay agrees
within float tolerance (bit-exactness needs the same world size)."""

from pathlib import Path

import pytest
import torch

from lmcleaner.trajectory import BatchReconstructor, TrajectoryLog, TrajectoryReplayer

from ..conftest import FAST, torchrun
from .conftest import REC

SCRIPT = Path(__file__).parents[1] / "train" / "scripts" / "two_rank_train.py"


@pytest.mark.slow
def test_two_rank_run_is_recorded_and_replayable(tmp_path):
    overrides = [*FAST, *REC, "training.max_steps=6", "training.max_grad_norm=1.0", "training_logger.storage=heavy"]
    torchrun(SCRIPT, [str(tmp_path), *overrides], port=29531, timeout=180)
    log = TrajectoryLog(tmp_path / "run" / "training_log")
    assert log.meta["world_size"] == 2 and log.steps == list(range(6))
    recon = BatchReconstructor.from_log(log)
    for r in log.records():
        assert len(r.micro_batches) == 2  # micro-step major, rank minor
        stored = log.batches(r.step)
        assert len(stored) == 2
        for a, b in zip(stored, recon.batches(r.step)):
            assert all(torch.equal(a[k], b[k]) for k in a)
    # one process replays the two-rank steps: same maths, other summation order
    for st in TrajectoryReplayer(log).iter_steps(0, 6):
        exact = log.params_at(st.step)
        for n, v in st.params.items():
            torch.testing.assert_close(v, exact[n], rtol=1e-4, atol=1e-5)
