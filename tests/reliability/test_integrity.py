"""Issue 10 §4 (readers check that checkpoints and log belong together) and §8 (integrity):
checkpoint hashes recorded in the log and checked on resume and replay, corruption in the
middle of ``steps.jsonl`` told apart from a crash's torn tail, and paths relative to the run
so a copied run reads its own checkpoints (old absolute-path logs still open)."""

from __future__ import annotations

import json
import shutil

import pytest

from lmcleaner.trajectory import TrajectoryLog

from .conftest import FORGET, RUN, assert_one_line_error, cli, edit_json, tree_hash

UNLEARN = ["unlearn", "trainer=replay", f"unlearn.forget={FORGET}"]


def _flip(path, offset_from_end: int = 9) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # inside the tensor data: safetensors itself cannot notice
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoint_is_refused_on_replay_and_resume(run_copy, tmp_path, capsys):
    _flip(run_copy / "checkpoint-8" / "model.safetensors")
    before = tree_hash(run_copy)
    rc, out, err = cli(capsys, *UNLEARN, f"unlearn.model_dir={run_copy}", f"unlearn.output_dir={tmp_path / 'o'}")
    assert_one_line_error(rc, out, err, "checkpoint-8/model.safetensors", "sha256")
    rc, out, err = cli(capsys, "train", *RUN, f"training.output_dir={run_copy}",
                       f"training.resume_from_checkpoint={run_copy / 'checkpoint-8'}")
    assert_one_line_error(rc, out, err, "checkpoint-8/model.safetensors", "sha256")
    assert tree_hash(run_copy) == before and not (tmp_path / "o").exists()


def test_a_checkpoint_from_elsewhere_does_not_belong_to_the_log(run_copy, tmp_path, capsys):
    """A self-consistent checkpoint (its own checksums.json agrees) swapped in from another step."""
    shutil.rmtree(run_copy / "checkpoint-8")
    shutil.copytree(run_copy / "checkpoint-16", run_copy / "checkpoint-8")
    rc, out, err = cli(capsys, *UNLEARN, f"unlearn.model_dir={run_copy}", f"unlearn.output_dir={tmp_path / 'o'}")
    assert_one_line_error(rc, out, err, "checkpoint-8 does not belong to this log")
    rc, out, err = cli(capsys, "inspect", run_copy / "training_log")
    assert_one_line_error(rc, out, err, "does not belong")


def test_paths_are_relative_and_a_copied_run_reads_its_own_checkpoints(base_run, tmp_path, capsys):
    doc = json.loads((base_run / "training_log" / "checkpoints.json").read_text())
    assert all(not p["path"].startswith("/") and p["files"] for p in doc["restore_points"])
    original, copy = tmp_path / "a" / "run", tmp_path / "b" / "moved"
    shutil.copytree(base_run, original)
    shutil.copytree(original, copy)
    # an old-format log: absolute paths into the original, no run_dir_relative in meta.json
    edit_json(copy / "training_log" / "checkpoints.json", lambda d: [
        rp.update(path=str(original / rp["path"].removeprefix("../"))) for rp in d["restore_points"]])
    edit_json(copy / "training_log" / "meta.json", lambda m: m.pop("run_dir_relative"))
    _flip(original / "checkpoint-8" / "model.safetensors")  # the original must not be read
    log = TrajectoryLog(copy / "training_log")
    assert all(str(p.path).startswith(str(copy)) for p in log.restore_points)
    assert log.run_dir == copy
    rc, out, err = cli(capsys, *UNLEARN, f"unlearn.model_dir={copy}", f"unlearn.output_dir={tmp_path / 'o'}")
    assert rc == 0, err
    record = json.loads((tmp_path / "o" / "audit" / "audit_records.json").read_text())[-1]
    assert record["source_run"] == str(copy)


def _damage_steps(log_dir, line: int | None) -> None:
    path = log_dir / "steps.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    if line is None:  # a crash: the last line is cut short
        path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    else:  # bit rot in the middle: intact lines follow
        bad = bytearray(lines[line])
        bad[15] ^= 0x20
        lines[line] = bytes(bad)
        path.write_bytes(b"".join(lines))


@pytest.mark.parametrize("line, words, state", [(5, "is corrupted and 18 intact line(s) follow it", "CORRUPTED"),
                                                (None, "torn or corrupted tail at line 24", "TORN")])
def test_mid_file_corruption_is_not_reported_as_a_torn_tail(run_copy, capsys, line, words, state):
    log_dir = run_copy / "training_log"
    _damage_steps(log_dir, line)
    rc, out, err = cli(capsys, "inspect", log_dir)
    assert_one_line_error(rc, out, err, words)
    rc, out, err = cli(capsys, "inspect", log_dir, "--tolerant")
    assert rc == 0
    tail = [t for t in out.splitlines() if t.startswith("tail:")][0]
    assert state in tail and (state == "TORN" or "are NOT used" in tail)
    if state == "CORRUPTED":
        assert "CORRUPTED" in tail and TrajectoryLog(log_dir, tolerant=True).steps == list(range(5))
    else:
        assert "CORRUPTED" not in tail
