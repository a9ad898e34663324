"""kill -9 between flushes, a torn tail, and resuming the same log seamlessly."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmcleaner.train import Trainer, list_checkpoints
from lmcleaner.trajectory import TrajectoryLog, TrajectoryLogError
from lmcleaner.trajectory.jsonl import encode_line

from ..conftest import FAST
from .conftest import REC, log_dir_of, rec_config

SCRIPT = Path(__file__).parent / "scripts" / "train_until_killed.py"
SETUP = [*REC, "training_logger.save_interval=5", "training_logger.checkpoint_interval=10", "training.max_steps=24",
         "training.gradient_accumulation_steps=2"]


def _kill_after(root: Path, stop: int) -> str:
    # same intra-op thread count as this process: CPU reductions (the grad norm) depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, str(SCRIPT), str(stop), *FAST, *SETUP, f"training.output_dir={root / 'run'}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), proc.stderr.read()[-3000:] if proc.poll() is not None else line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return line


def test_kill_torn_tail_and_resume(tmp_path):
    cfg = rec_config(tmp_path, *SETUP)
    line = _kill_after(tmp_path, stop=17)
    assert line.split() == ["READY", "14"]
    log_dir = log_dir_of(cfg)

    # killed between flushes: valid up to the last flush (steps 15..17 were only in memory)
    log = TrajectoryLog(log_dir)
    assert log.steps == list(range(15)) and not log.closed and not log.tail.torn
    assert [p.step for p in log.restore_points] == [0, 10]

    # a kill in the middle of a flush leaves a torn line and lines beyond the commit point
    ghost = encode_line({**log.record(14).to_json(), "step": 15})
    with open(log_dir / "steps.jsonl", "ab") as f:
        f.write(ghost[: len(ghost) // 2])
    with open(log_dir / "sample_indices.jsonl", "ab") as f:
        f.write(encode_line({"id": 1, "step": 15, "mb": 0, "pos": 0}))
    with pytest.raises(TrajectoryLogError, match=r"steps\.jsonl: torn or corrupted tail .*last valid step 14") as err:
        TrajectoryLog(log_dir)
    assert "\n" not in str(err.value)
    torn = TrajectoryLog(log_dir, tolerant=True)
    assert torn.steps == list(range(15)) and torn.tail.torn and torn.tail.last_valid_step == 14
    assert {p.file for p in torn.tail.problems} == {"steps.jsonl", "sample_indices.jsonl"}
    assert "TORN after step 14" in _inspect(log_dir, "--tolerant")

    # resume: the crashed run's records >= 10 are dropped, then recorded again, no gap, no duplicate
    resumed = Trainer(rec_config(tmp_path, *SETUP, "training.resume_from_checkpoint=latest"))
    resumed.train()
    log = TrajectoryLog(log_dir)
    assert log.steps == list(range(24)) and log.closed and not log.tail.torn
    assert log.meta["resumes"][0]["step"] == 10
    assert all(len(log.sample_uses(i)) == sum(i in r.sample_ids for r in log.records()) for i in range(48))

    # ... and it is the log an uninterrupted run writes
    ref_cfg = rec_config(tmp_path / "ref", *SETUP)
    Trainer(ref_cfg).train()
    ref = TrajectoryLog(log_dir_of(ref_cfg))
    assert [r.to_json() for r in log.records()] == [r.to_json() for r in ref.records()]
    assert [p.step for p in log.restore_points] == [p.step for p in ref.restore_points] == [0, 10, 20, 24]


def test_resume_with_missing_steps_is_refused(tmp_path):
    cfg = rec_config(tmp_path, *SETUP, "training.max_steps=12")
    Trainer(cfg).train()
    log_dir = log_dir_of(cfg)
    lines = (log_dir / "steps.jsonl").read_bytes().splitlines(keepends=True)
    (log_dir / "steps.jsonl").write_bytes(b"".join(lines[:7]))  # as if steps 7..11 never reached the disk
    assert 10 in list_checkpoints(cfg.training.output_dir)
    import shutil

    shutil.rmtree(Path(cfg.training.output_dir) / "checkpoint-12")
    with pytest.raises(TrajectoryLogError, match=r"ends at step 6 but training resumes at step 10"):
        Trainer(rec_config(tmp_path, *SETUP, "training.max_steps=12", "training.resume_from_checkpoint=latest")).train()


def _inspect(log_dir: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "lmcleaner.trajectory.cli", str(log_dir), *args],
                          env=env, capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def test_resume_with_a_longer_budget_continues_the_log_and_replays_exactly(tmp_path):
    from lmcleaner.trajectory import TrajectoryReplayer

    base = [*REC, "training.max_steps=8", "training.scheduler=linear", "training.warmup_steps=2"]
    Trainer(rec_config(tmp_path, *base)).train()
    cfg = rec_config(tmp_path, *REC, "training.max_steps=14", "training.scheduler=linear", "training.warmup_steps=2",
                     "training.resume_from_checkpoint=latest")
    Trainer(cfg).train()
    log = TrajectoryLog(log_dir_of(cfg))
    assert log.steps == list(range(14)) and log.barrier_steps == [8]
    assert log.restore_point_for(12).step == 10 and log.restore_point_for(9).step == 8
    # every replayed step is checked against its record (loss, grad norm, applied lr): a wrong
    # LR schedule after the resume would raise ReplayMismatchError
    assert [s.step for s in TrajectoryReplayer(log).iter_steps(0, 14, grads=False, opt_state=False)] == list(range(14))
