"""Issue 10 §7 and §9 on real file systems: a disk that fills up during training or
unlearning ends in one line (exit 2) with no half-written ``*.tmp-PID`` left behind, and a
resume from the last good checkpoint is bit-identical to the uninterrupted run; a read-only
output is refused before any computation. Small tmpfs mounts (skipped where mounting is not
permitted)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmcleaner.cli.main import main

from .conftest import FORGET, RUN, assert_one_line_error, tmpfs, remount, tree_hash


def _leftovers(root):
    return [p for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name or ".lmcleaner" in p.name]


def _run(capfd, *args):
    rc = main([str(a) for a in args])
    c = capfd.readouterr()
    return rc, c.out, c.err


@pytest.mark.slow
def test_disk_full_while_training_then_resume_is_bit_exact(base_run, tmp_path, capfd):
    with tmpfs(tmp_path / "small", "900k") as disk:
        run = disk / "run"
        rc, out, err = _run(capfd, "train", *RUN, f"training.output_dir={run}")
        # a run that started logs its start; the failure itself is one line, never a traceback
        assert rc == 2 and "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("lmcleaner train: error: no space left on device writing "), last
        assert not _leftovers(run), _leftovers(run)
        done = sorted(p.name for p in run.glob("checkpoint-*"))
        assert done and "checkpoint-24" not in done
        remount(disk, "64m")
        rc, out, err = _run(capfd, "train", *RUN, f"training.output_dir={run}",
                            "training.resume_from_checkpoint=latest")
        assert rc == 0, err
        resumed = load_file(str(run / "final_model" / "model.safetensors"))
        reference = load_file(str(base_run / "final_model" / "model.safetensors"))
        assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)
        assert not _leftovers(run)


def test_disk_full_while_writing_the_unlearned_model(run_copy, tmp_path, capfd):
    before = tree_hash(run_copy)
    with tmpfs(tmp_path / "tiny", "48k") as disk:
        rc, out, err = _run(capfd, "unlearn", "trainer=replay", f"unlearn.model_dir={run_copy}",
                            f"unlearn.forget={FORGET}", f"unlearn.output_dir={disk / 'out'}",
                            "training.progress_bar=false")  # the computation's progress lines precede the failure
        assert_one_line_error(rc, out, err, "no space left on device", str(disk))
        assert list(disk.iterdir()) == [], "nothing half-written stays on the full disk"
    assert tree_hash(run_copy) == before


def test_read_only_outputs_are_refused_before_any_computation(run_copy, tmp_path, capfd, monkeypatch):
    from lmcleaner.evaluate import runner as eval_runner  # `lmcleaner eval` imports it when it runs
    from lmcleaner.train import trainer as trainer_mod
    from lmcleaner.unlearn.session import UnlearnSession

    def must_not_run(*a, **k):
        raise AssertionError("the computation started before the output was checked")

    monkeypatch.setattr(UnlearnSession, "run", must_not_run)
    monkeypatch.setattr(eval_runner, "evaluate_models", must_not_run)
    monkeypatch.setattr(trainer_mod.Trainer, "_train_locked", must_not_run)
    before = tree_hash(run_copy)
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        cases = [
            ("unlearn", "trainer=replay", f"unlearn.model_dir={run_copy}", f"unlearn.forget={FORGET}",
             f"unlearn.output_dir={ro / 'out'}"),
            ("retrain", f"unlearn.model_dir={run_copy}", f"unlearn.forget={FORGET}", f"unlearn.output_dir={ro / 'out'}"),
            ("eval", "--model", f"m={run_copy / 'final_model'}", "--out", ro / "eval"),
            ("train", *RUN, f"training.output_dir={ro / 'run'}"),
            ("lr-find", *RUN, "--plot", ro / "lr.png"),
        ]
        for args in cases:
            rc, out, err = _run(capfd, *args)
            assert_one_line_error(rc, out, err, "read-only file system", str(ro))
    assert tree_hash(run_copy) == before
