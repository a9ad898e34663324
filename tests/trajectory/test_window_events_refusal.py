"""Window pruning, online deletion events, and refusing another run's log."""

import pytest

from lmcleaner.train import Trainer, list_checkpoints
from lmcleaner.trajectory import TrajectoryLog, TrajectoryLogError, TrajectoryReplayer

from .conftest import equal_dicts, log_dir_of, rec_config, train_capturing


def test_window_pruning_keeps_exactly_what_the_window_needs(tmp_path):
    cfg = rec_config(tmp_path, "training.max_steps=20", "training_logger.max_steps=6",
                     "training_logger.checkpoint_interval=3", "training_logger.save_interval=2")
    trainer, rec = train_capturing(cfg)
    log = TrajectoryLog(log_dir_of(cfg))
    # tau=20, window [14, 20): replay starts at checkpoint-12; older checkpoints were deleted
    assert [p.step for p in log.restore_points] == [12, 15, 18, 20]
    assert set(list_checkpoints(cfg.training.output_dir)) == {12, 15, 18, 20}
    lo, hi = log.window
    assert lo <= 14 and hi == 20 and log.first_step <= 12 and log.last_step == 19
    assert log.first_step > 0, "old records were compacted away"
    assert equal_dicts(TrajectoryReplayer(log).params_at(14), rec.params[14])
    with pytest.raises(TrajectoryLogError, match="outside the window"):
        log.restore_point_for(5)


def test_online_deletion_events_are_recorded_and_replay_crosses_them(tmp_path):
    cfg = rec_config(tmp_path, "training.max_steps=12")
    calls = []

    def fake_unlearner(trainer, ids, step):  # an "online correction" that changes the weights
        import torch

        with torch.no_grad():
            for p in trainer.engine.trainable().values():
                p.mul_(0.99)
        calls.append((step, ids))
        return {"method": "fake", "norm": 0.5}

    from .conftest import CapturingLogger

    rec = CapturingLogger(cfg.training_logger, log_dir_of(cfg))
    trainer = Trainer(cfg, recorder=rec, online_unlearner=fake_unlearner)
    forget = trainer.plan.micro_batches(9)[0][:2]
    rec.step_end_hook = lambda r: trainer.request_forget(forget, "req-1") if r.step == 6 else None
    trainer.train()
    assert calls == [(7, forget)]
    log = TrajectoryLog(log_dir_of(cfg))
    (ev,) = log.events
    assert ev["step"] == 7 and ev["ids"] == forget and ev["request_id"] == "req-1" and ev["method"] == "fake"
    assert ev["anchor"] == "anchors/step-7"
    assert set(log.record(9).excluded) == set(forget)
    assert [(p.step, p.kind) for p in log.restore_points] == [(0, "checkpoint"), (5, "checkpoint"), (7, "anchor"),
                                                             (10, "checkpoint"), (12, "checkpoint")]
    # theta_7 includes the correction; replaying across it needs the anchor
    assert log.restore_point_for(7).kind == "anchor" and log.restore_point_for(9).kind == "anchor"
    for st in TrajectoryReplayer(log).iter_steps(4, 12):
        assert equal_dicts(st.params, rec.params[st.step]), st.step


def test_another_runs_log_is_refused(tmp_path):
    shared = tmp_path / "shared_log"
    a = rec_config(tmp_path / "a", "training.max_steps=2", f"training_logger.log_dir={shared}")
    Trainer(a).train()
    other_data = rec_config(tmp_path / "b", "training.max_steps=2", "training.num_samples=40",
                            f"training_logger.log_dir={shared}")
    with pytest.raises(TrajectoryLogError, match="holds the training log of another run") as err:
        Trainer(other_data).train()
    assert "\n" not in str(err.value)
    same_run_fresh = rec_config(tmp_path / "c", "training.max_steps=2", f"training_logger.log_dir={shared}")
    with pytest.raises(TrajectoryLogError, match="already holds a training log of this run"):
        Trainer(same_run_fresh).train()
    assert TrajectoryLog(shared).steps == [0, 1]  # untouched
