"""Issue 10 §4: one writer per run. A live training run holds an exclusive lock on its
directory (an OS lock that dies with the process); a second ``train ... resume=latest`` is
refused in one line naming the holder's PID and writes nothing; readers need no lock; once
the holder is killed, resuming works and the log replays exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmcleaner.train.runlock import RunLock, RunLockError
from lmcleaner.trajectory import TrajectoryLog, TrajectoryReplayer

from .conftest import RUN, assert_one_line_error, child_env, cli, tree_hash

HOLDER = Path(__file__).parents[1] / "trajectory" / "scripts" / "train_until_killed.py"


@pytest.mark.slow
def test_live_run_plus_resume_is_refused_then_resume_after_kill_is_exact(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [*RUN, f"training.output_dir={run}"]
    holder = subprocess.Popen([sys.executable, str(HOLDER), "10", *overrides], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line.startswith("READY"), holder.stderr.read()[-3000:] if holder.poll() is not None else line
        before = tree_hash(run, skip=("telemetry",))
        second = subprocess.run([sys.executable, "-m", "lmcleaner.cli.main", "train", *overrides,
                                 "training.resume_from_checkpoint=latest"], env=child_env(), capture_output=True,
                                text=True, timeout=300)
        assert_one_line_error(second.returncode, second.stdout, second.stderr, f"process {holder.pid}",
                              "exclusive run lock")
        assert tree_hash(run, skip=("telemetry",)) == before, "the refused writer wrote into the run"
        # readers take no lock
        rc, out, err = cli(capsys, "inspect", run / "training_log")
        assert rc == 0 and "not closed" in out, err
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    # the lock died with the holder: resume continues the same log, which then replays exactly
    rc, _, err = cli(capsys, "train", *overrides, "training.resume_from_checkpoint=latest")
    assert rc == 0, err
    log = TrajectoryLog(run / "training_log")
    assert log.steps == list(range(24)) and not log.tail.torn
    replayer = TrajectoryReplayer(log)  # verifies every replayed step against its record
    assert sum(1 for _ in replayer.iter_steps(0, 24, grads=False, opt_state=False)) == 24


def test_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockError, match=r"being written by this process .*training.output_dir"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit
        pass
    assert list(tmp_path.iterdir()) == [], "taking the lock writes nothing into the directory"
