"""``lmcleaner inspect``: text, --sample, --json, --help and errors."""

import argparse
import json

import pytest

from lmcleaner.trajectory import TrajectoryLog
from lmcleaner.trajectory.cli import register, run

from .conftest import log_dir_of, rec_config, train_capturing


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    cfg = rec_config(tmp_path_factory.mktemp("cli"), "training.max_steps=6")
    train_capturing(cfg)
    return log_dir_of(cfg)


def _parser():
    p = argparse.ArgumentParser(prog="lmcleaner")
    register(p.add_subparsers(dest="command"))
    return p


def _run(capsys, *argv):
    args = _parser().parse_args(["inspect", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_text_summary_and_sample_lookup(log_dir, capsys):
    code, out, _ = _run(capsys, str(log_dir), "--sample", "5")
    assert code == 0
    for needle in ("steps:          0..5 (6 steps)", "storage/mode:   light / batch", "window:", "replayable 0..5",
                   "bytes/step:", "checkpoints:    3", "0, 5, 6", "tail:           clean, closed", "sample 5:"):
        assert needle in out, needle
    uses = TrajectoryLog(log_dir).sample_uses(5)
    assert uses and all(f"step {u.step:>6}  micro-batch {u.micro_batch:>3}  row {u.position:>3}" in out for u in uses)


def test_json_output(log_dir, capsys):
    code, out, _ = _run(capsys, str(log_dir), "--json", "--sample", "5", "--sample", "6")
    s = json.loads(out)
    assert code == 0 and s["steps"] == 6 and s["storage"] == "light" and s["window"]["replayable"] == [0, 6]
    assert 0 < s["bytes_per_step"] < 1024 and [p["step"] for p in s["restore_points"]] == [0, 5, 6]
    assert set(s["samples"]) == {"5", "6"} and s["tail"]["closed"] and not s["tail"]["torn"]


def test_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["inspect", "--help"])
    help_text = capsys.readouterr().out
    assert "LOG_DIR" in help_text and "--sample" in help_text and "--tolerant" in help_text
    code, out, err = _run(capsys, str(tmp_path))
    assert code == 2 and "not a training log" in err and "\n" not in err.strip()
    code, out, _ = _run(capsys, str(tmp_path), "--json")
    assert code == 2 and "error" in json.loads(out)
    assert run is not None
