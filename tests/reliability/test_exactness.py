"""Issue 10 §3 and §5: a result never claims to have forgotten what it did not.

- ``unlearn``: an id used before the replayable window *and* inside it is refused (only the
  in-window uses could be removed), naming its earliest use and the window;
- ``retrain``: the same check over the steps it re-runs, plus what would make it another run:
  changed data (dataset fingerprint), another world size (the recorded global batch is kept
  exactly, or the retrain is refused), a resume that changed the step budget mid-run.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmcleaner.data import BatchPlan
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.session import UnlearnError, UnlearnSession

from .conftest import RUN, assert_one_line_error, cli, edit_json, tree_hash


def test_a_sample_used_before_and_inside_the_window_is_refused(tmp_path, capsys):
    run = tmp_path / "win"
    # 16 steps of 12 per epoch, window 4 steps: the window is 12..15, epoch 0 (steps 0..11) is pruned
    assert cli(capsys, "train", *RUN, "training.max_steps=16", "training_logger.max_steps=4",
               "training_logger.checkpoint_interval=4", f"training.output_dir={run}")[0] == 0
    session = UnlearnSession(run)
    lo, hi = session.log.window
    assert (lo, hi) == (12, 16) and session.log.first_step > 0
    plan = BatchPlan(48, 4, 1, 1, 42)
    victim = plan.micro_batches(14)[0][0]  # used at step 14 (in the window) and once in epoch 0
    first_use = next(s for s in range(16) if victim in plan.micro_batches(s)[0])
    assert first_use < lo and session.log.steps_containing([victim]) == [14]
    with pytest.raises(UnlearnError, match=rf"earliest use: sample {victim} at step {first_use}.*"):
        session.run("replay", [victim])
    before = tree_hash(run)
    rc, out, err = cli(capsys, "unlearn", "trainer=LMCleanerSample", f"unlearn.model_dir={run}",
                       f"unlearn.forget={victim}", f"unlearn.output_dir={tmp_path / 'out'}")
    assert_one_line_error(rc, out, err, "before the replayable window (steps 12..15)", f"step {first_use}")
    assert tree_hash(run) == before and not (tmp_path / "out").exists()


def test_retrain_refuses_changed_data(tmp_path, capsys):
    rows = [{"question": f"What is item {i}?", "answer": f"It is number {i}."} for i in range(24)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert cli(capsys, "train", *RUN, "training.max_steps=4", "training.num_samples=24", "model.tokenizer=embedded",
               f"training.dataset_name={data}", f"training.output_dir={run}")[0] == 0
    rows[5]["answer"] = "Something else."  # one changed row: a retrain now trains on other data
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = tree_hash(run)
    for command in (["retrain"], ["unlearn", "trainer=replay"]):
        rc, out, err = cli(capsys, *command, f"unlearn.model_dir={run}", "unlearn.forget=1",
                           f"unlearn.output_dir={tmp_path / 'out'}")
        assert_one_line_error(rc, out, err, "fingerprint")
        assert not (tmp_path / "out").exists()
    assert tree_hash(run) == before


def test_retrain_keeps_the_recorded_global_batch_of_another_world_size(tmp_path, capsys):
    """A log recorded by 2 ranks x 1 micro-step is retrained by one process x 2 micro-steps: the
    same micro-batches in the same order, so retrain equals exact replay of the log."""
    run = tmp_path / "run"
    assert cli(capsys, "train", *RUN, "training.max_steps=8", "training.gradient_accumulation_steps=2",
               f"training.output_dir={run}")[0] == 0

    def as_two_ranks(meta):  # what a 2-rank recording of this run looks like
        meta.update(world_size=2, gradient_accumulation_steps=1)
        meta["config"]["training"]["gradient_accumulation_steps"] = 1

    edit_json(run / "training_log" / "meta.json", as_two_ranks)
    forget = "3,17"
    rc, out, err = cli(capsys, "retrain", f"unlearn.model_dir={run}", f"unlearn.forget={forget}",
                       f"unlearn.output_dir={tmp_path / 'retrain'}")
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["gradient_accumulation_steps"] == 2 and summary["world_size"] == 1
    rc, out, err = cli(capsys, "unlearn", "trainer=replay", f"unlearn.model_dir={run}", f"unlearn.forget={forget}",
                       f"unlearn.output_dir={tmp_path / 'replay'}")
    assert rc == 0, err
    a = load_file(str(tmp_path / "retrain" / "final_model" / "model.safetensors"))
    b = load_file(str(tmp_path / "replay" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_retrain_refuses_a_world_size_that_cannot_hold_the_global_batch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    from lmcleaner.config import load_config, to_dict

    cfg = to_dict(load_config(overrides=["training.gradient_accumulation_steps=1"]))
    (run / "trainer_state.json").write_text(json.dumps({"config": cfg, "world_size": 3}))
    with pytest.raises(UnlearnError, match="recorded on 3 ranks .*do not split over 2 processes"):
        retrain_config(run, [1], tmp_path / "out", world_size=2)
    assert retrain_config(run, [1], tmp_path / "out", world_size=3).training.gradient_accumulation_steps == 1
    assert retrain_config(run, [1], tmp_path / "out", world_size=1).training.gradient_accumulation_steps == 3


def test_retrain_refuses_a_run_whose_budget_changed_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    common = [*RUN, "training_logger.checkpoint_interval=4", f"training.output_dir={run}"]
    assert cli(capsys, "train", *common, "training.max_steps=8")[0] == 0
    assert cli(capsys, "train", *common, "training.max_steps=12", "training.resume_from_checkpoint=latest")[0] == 0
    rc, out, err = cli(capsys, "retrain", f"unlearn.model_dir={run}", "unlearn.forget=3",
                       f"unlearn.output_dir={tmp_path / 'out'}")
    assert_one_line_error(rc, out, err, "resumed at step 8 with another training.max_steps", "trainer=replay")
    assert not (tmp_path / "out").exists()
