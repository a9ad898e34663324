"""Issue 10 §2 and §6: no command writes over its source, results appear atomically with
their audit, the audit is append-only, and temp dirs of killed commands are cleaned up
(and never created inside the source run).

The output-over-source matrix runs in-process through ``lmcleaner.cli.main.main``; the
kill at the rename needs a real process (SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmcleaner.train.outputs import MARKER, AtomicDir

from .conftest import FORGET, assert_one_line_error, child_env, cli, tree_hash

SCRIPT = Path(__file__).parent / "scripts" / "unlearn_killed_at_rename.py"
UNLEARN = ["unlearn", "trainer=replay", f"unlearn.forget={FORGET}"]


def _targets(run: Path) -> dict[str, tuple[Path, bool, str]]:
    """name -> (output_dir, overwrite, expected words): every way an output can hit the source."""
    return {
        "the run itself": (run, False, "is the source run"),
        "the run itself, overwrite": (run, True, "is the source run"),
        "its final model": (run / "final_model", False, "inside the source run"),
        "its final model, overwrite": (run / "final_model", True, "inside the source run"),
        "its log": (run / "training_log", True, "inside the source run"),
        "a checkpoint": (run / "checkpoint-8", True, "inside the source run"),
        "a new dir inside the run": (run / "mine", False, "inside the source run"),
        "the run's parent, overwrite": (run.parent, True, "contains the source"),
        "an existing dir": (run.parent / "taken", False, "already exists"),
        "an existing file": (run.parent / "taken.txt", True, "not a directory"),
    }


@pytest.mark.parametrize("command", ["unlearn", "retrain"])
def test_output_over_the_source_is_refused(run_copy, capsys, command):
    (run_copy.parent / "taken").mkdir()
    (run_copy.parent / "taken" / "keep.txt").write_text("mine")
    (run_copy.parent / "taken.txt").write_text("mine")
    before = tree_hash(run_copy.parent)
    args = UNLEARN if command == "unlearn" else ["retrain", f"unlearn.forget={FORGET}"]
    for name, (out, overwrite, words) in _targets(run_copy).items():
        rc, stdout, err = cli(capsys, *args, f"unlearn.model_dir={run_copy}", f"unlearn.output_dir={out}",
                              f"unlearn.overwrite={str(overwrite).lower()}")
        assert_one_line_error(rc, stdout, err, words)
        assert tree_hash(run_copy.parent) == before, f"{command} into {name} wrote something"


def test_eval_out_is_never_a_model_directory(run_copy, capsys):
    model = run_copy / "final_model"
    before = tree_hash(run_copy)
    for out, words in ((model, "is the source"), (model / "eval", "inside the source"), (run_copy.parent, "contains")):
        rc, stdout, err = cli(capsys, "eval", "--model", f"m={model}", "--out", out, "--max-rows", "2")
        assert_one_line_error(rc, stdout, err, words)
    assert tree_hash(run_copy) == before


def test_default_output_is_a_fresh_name_and_overwrite_keeps_the_audit(run_copy, tmp_path, capsys):
    before = tree_hash(run_copy)
    outs = []
    for _ in range(2):
        rc, stdout, err = cli(capsys, *UNLEARN, f"unlearn.model_dir={run_copy}")
        assert rc == 0, err
        outs.append(Path(json.loads(stdout.strip().splitlines()[-1])["output_dir"]))
    assert [p.name for p in outs] == ["unlearned-replay", "unlearned-replay-2"]
    # the run's own files are untouched; only the fresh default directories were added
    assert tree_hash(run_copy, skip=("unlearned-",)) == before
    # no temporary directory was ever left inside (or next to) the run
    assert not [p for p in run_copy.parent.iterdir() if ".tmp-" in p.name]

    out = tmp_path / "unlearned"
    for overwrite in ("false", "true", "true"):
        rc, _, err = cli(capsys, *UNLEARN, f"unlearn.model_dir={run_copy}", f"unlearn.output_dir={out}",
                         f"unlearn.overwrite={overwrite}")
        assert rc == 0, err
    records = json.loads((out / "audit" / "audit_records.json").read_text())
    assert len(records) == 3 and len({r["request_id"] for r in records}) == 3, "the audit must be append-only"
    assert (out / "model.safetensors").is_file() and not (out / MARKER).exists()


def test_a_damaged_audit_is_never_silently_replaced(run_copy, tmp_path, capsys):
    out = tmp_path / "unlearned"
    assert cli(capsys, *UNLEARN, f"unlearn.model_dir={run_copy}", f"unlearn.output_dir={out}")[0] == 0
    (out / "audit" / "audit_records.json").write_text("{not json")
    before = tree_hash(out)
    rc, stdout, err = cli(capsys, *UNLEARN, f"unlearn.model_dir={run_copy}", f"unlearn.output_dir={out}",
                          "unlearn.overwrite=true")
    assert_one_line_error(rc, stdout, err, "unreadable audit log")
    assert tree_hash(out) == before


def _unlearn_killed(mode: str, run: Path, *extra: str) -> str:
    cmd = [sys.executable, str(SCRIPT), mode, *UNLEARN[1:], f"unlearn.model_dir={run}", *extra]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "KILLED" in proc.stdout
    return proc.stdout


@pytest.mark.slow
def test_kill_at_the_rename_leaves_source_and_old_result_and_is_cleaned_up(run_copy, capsys):
    """One real SIGKILL at the worst moment: replacing an earlier result (the default location,
    inside the run) after the old one was moved aside and before the new one is renamed in."""
    rc, stdout, err = cli(capsys, *UNLEARN, f"unlearn.model_dir={run_copy}")
    assert rc == 0, err
    out = Path(json.loads(stdout.strip().splitlines()[-1])["output_dir"])
    assert out == run_copy.resolve() / "unlearned-replay"
    before, old = tree_hash(run_copy, skip=("unlearned-",)), tree_hash(out)

    _unlearn_killed("swap", run_copy, f"unlearn.output_dir={out}", "unlearn.overwrite=true")
    assert tree_hash(run_copy, skip=("unlearned-",)) == before, "the source run changed"
    assert not out.exists() and [p for p in run_copy.iterdir() if ".old-" in p.name]
    assert not [p for p in run_copy.iterdir() if ".tmp-" in p.name], "temp dirs never go inside the source run"
    (tmp,) = [p for p in run_copy.parent.iterdir() if ".tmp-" in p.name]
    assert (tmp / "model.safetensors").is_file()
    assert len(json.loads((tmp / "audit" / "audit_records.json").read_text())) == 2, \
        "the audit (with the replaced result's record) is written before the rename"

    # the next command puts the old result back, removes the dead process's temp dir, and appends
    rc, _, err = cli(capsys, *UNLEARN, f"unlearn.model_dir={run_copy}", f"unlearn.output_dir={out}")
    assert_one_line_error(rc, "", err, "already exists")  # the old result is back in place
    assert tree_hash(out) == old and not [p for p in run_copy.iterdir() if ".old-" in p.name]
    assert cli(capsys, *UNLEARN, f"unlearn.model_dir={run_copy}", f"unlearn.output_dir={out}",
               "unlearn.overwrite=true")[0] == 0
    assert not tmp.exists(), "the dead process's temp dir is removed by the next writer there"
    assert len(json.loads((out / "audit" / "audit_records.json").read_text())) == 2
    assert tree_hash(run_copy, skip=("unlearned-",)) == before


def test_stale_temp_dirs_are_removed_only_when_ours_and_dead(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    ours_dead = tmp_path / f"result.tmp-{dead}"
    ours_dead.mkdir()
    (ours_dead / MARKER).write_text(dead)
    alive = tmp_path / f"result.tmp-{os.getppid()}"  # a live process (our parent)
    alive.mkdir()
    (alive / MARKER).write_text("x")
    foreign = tmp_path / f"someone-else.tmp-{dead}"  # no marker: not created by lmcleaner
    foreign.mkdir()
    AtomicDir(tmp_path / "new").reserve().abort()
    assert not ours_dead.exists() and alive.exists() and foreign.exists()
