"""Light mode with AdamW, accumulation and active clipping: what is recorded, and
replay that reproduces the run bit for bit (parameters, optimizer state, gradient)."""

import json

import pytest
import torch

from lmcleaner.data import BatchPlan
from lmcleaner.train import Trainer, list_checkpoints
from lmcleaner.trajectory import BatchReconstructor, TrajectoryLog, TrajectoryReplayer
from lmcleaner.trajectory.types import OptimizerSpec

from .conftest import ADAMW, equal_dicts, log_dir_of, rec_config, train_capturing

STEPS = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = rec_config(tmp_path_factory.mktemp("adamw"), *ADAMW, f"training.max_steps={STEPS}")
    trainer, rec = train_capturing(cfg)
    return cfg, trainer, rec, TrajectoryLog(log_dir_of(cfg))


def test_every_step_is_recorded_with_the_applied_values(run):
    cfg, trainer, rec, log = run
    assert log.steps == list(range(STEPS)) and log.closed and not log.tail.torn
    plan = BatchPlan(48, 4, 2, 1, cfg.training.seed)
    clipped = 0
    for r in log.records():
        assert r.micro_batches == plan.micro_batches(r.step)  # global batch, per micro-batch, in order
        assert len(r.micro_batches) == 2
        assert r.epoch == plan.locate(r.step)[0]
        assert r.lrs == rec.lr_before[r.step]  # the applied learning rate, not the next step's
        h = trainer.state.history[r.step]
        assert (r.loss, r.grad_norm) == (h["loss"], h["grad_norm"])
        assert r.clipped == (r.grad_norm > 0.05)
        assert r.normaliser == sum(trainer.dataset.supervised_tokens(i) for i in r.sample_ids)
        clipped += r.clipped
    assert clipped >= STEPS // 2, "clipping must be active for this test to mean anything"
    assert log.record(0).lrs == [0.0] and log.record(1).lrs[0] > 0  # warmup: step 0 applied lr 0


def test_meta_has_optimizer_fingerprints_and_config(run):
    cfg, trainer, _, log = run
    meta = json.loads((log.log_dir / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["storage"] == "light"
    assert meta["optimizer_type"] == "AdamW" and meta["optimizer_hparams"]["betas"] == [0.9, 0.999]
    assert OptimizerSpec.from_json(meta["optimizer"]) == trainer.optimizer_spec
    assert meta["dataset_fingerprint"] == trainer.dataset.fingerprint
    assert meta["config"]["training"]["gradient_accumulation_steps"] == 2
    assert len(meta["run_fingerprint"]) == 32


def test_indices_checkpoints_and_lookups(run):
    cfg, trainer, _, log = run
    bi = json.loads((log.log_dir / "batch_index.json").read_text())
    assert bi["closed"] and bi["last_step"] == STEPS - 1
    assert {int(k): v for k, v in bi["batches"].items()} == {r.step: r.micro_batches for r in log.records()}
    for sid in (0, 7, 33):
        uses = log.sample_uses(sid)
        assert uses == sorted(uses, key=lambda u: u.step)
        want = [(r.step, m, mb.index(sid)) for r in log.records() for m, mb in enumerate(r.micro_batches) if sid in mb]
        assert [(u.step, u.micro_batch, u.position) for u in uses] == want and want
    # theta_0 and every C=5 steps; the trainer kept exactly those (window 1000 > 20 steps)
    assert [p.step for p in log.restore_points] == [0, 5, 10, 15, 20]
    assert set(list_checkpoints(cfg.training.output_dir)) == {0, 5, 10, 15, 20}
    assert log.restore_point_for(13).step == 10 and log.window == (0, STEPS)


def test_replay_is_bit_exact_and_goes_forward_once(run):
    cfg, trainer, rec, log = run
    rp = TrajectoryReplayer(log)
    seen = []
    for st in rp.iter_steps(3, STEPS):
        t = st.step
        seen.append(t)
        assert equal_dicts(st.params, rec.params[t]), t
        assert equal_dicts(st.grad, rec.grads[t]), t  # unclipped gradient
        assert st.opt_state.keys() == rec.opt[t].keys()
        for n in rec.opt[t]:
            assert equal_dicts(st.opt_state[n], rec.opt[t][n]), (t, n)
        assert len(st.batches) == 2
        assert all(torch.equal(a[k], b[k]) for a, b in zip(st.batches, rec.seen_batches[t]) for k in a)
    assert seen == list(range(3, STEPS))
    assert rp.steps_run == STEPS - 0  # restore checkpoint-0, 3 steps to reach 3, then one per step
    assert equal_dicts(rp.params_at(STEPS), rec.final)
    # going back restores the nearest checkpoint, not theta_0
    before = rp.steps_run
    assert equal_dicts(rp.params_at(12), rec.params[12])
    assert rp.steps_run - before == 2  # from checkpoint-10
    params, opt = rp.state_at(0)
    assert opt[next(iter(opt))] == {} and equal_dicts(params, rec.params[0])  # no state before the first step


def test_batch_reconstruction_equals_what_the_step_used(run):
    cfg, trainer, rec, log = run
    recon = BatchReconstructor.from_log(log)
    for t in range(STEPS):
        got = recon.batches(t)
        assert len(got) == len(rec.seen_batches[t])
        for a, b in zip(got, rec.seen_batches[t]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_counterfactual_replay_equals_retraining_without_the_samples(run, tmp_path):
    cfg, trainer, rec, log = run
    forget = [7, 33]
    first = log.steps_containing(forget)[0]
    res = TrajectoryReplayer(log).counterfactual(forget)
    assert res.start == first and res.end == STEPS and res.restored_from == (first // 5) * 5
    assert res.steps_replayed == STEPS - res.restored_from
    assert all(set(r.excluded) <= set(forget) for r in res.records)
    assert any(r.excluded for r in res.records)
    # the exact-retrain oracle: the same run from scratch with the samples excluded everywhere
    oracle_cfg = rec_config(tmp_path, *ADAMW, f"training.max_steps={STEPS}", "training_logger.enabled=false",
                            f"training.exclude_ids=[{forget[0]},{forget[1]}]")
    oracle = Trainer(oracle_cfg)
    oracle.train()
    assert equal_dicts(res.params, {n: p.detach() for n, p in oracle.engine.trainable().items()})
    assert not equal_dicts(res.params, rec.final)


def test_replay_uses_the_recorded_thread_count(run):
    cfg, trainer, rec, log = run
    recorded = log.meta["torch_num_threads"]
    if recorded < 2:
        pytest.skip("recorded with one thread")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a reduction order that differs from training's
    try:
        assert equal_dicts(TrajectoryReplayer(log).params_at(8), rec.params[8])
        assert torch.get_num_threads() == 1  # restored after each replayed step
    finally:
        torch.set_num_threads(before)
