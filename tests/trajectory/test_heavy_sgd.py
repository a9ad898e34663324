"""Heavy mode (with SGD + momentum): stored batches and update vectors give past
parameters without dataset or replay, and replay agrees with them bit for bit."""

import shutil

import pytest
import torch

from lmcleaner.train.engine import step_seed

from lmcleaner.trajectory import BatchReconstructor, TrajectoryLog, TrajectoryLogError, TrajectoryReplayer

from .conftest import SGD, equal_dicts, log_dir_of, rec_config, train_capturing

STEPS = 14


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = rec_config(tmp_path_factory.mktemp("heavy"), *SGD, f"training.max_steps={STEPS}",
                     "training_logger.storage=heavy")
    trainer, rec = train_capturing(cfg)
    return cfg, trainer, rec, TrajectoryLog(log_dir_of(cfg))


def test_heavy_parameters_are_exact_without_replay(run):
    cfg, trainer, rec, log = run
    assert log.meta["updates_exact"] and log.has_updates and log.has_batches
    for t in range(STEPS):
        assert equal_dicts(log.params_at(t), rec.params[t]), t
    assert equal_dicts(log.params_at(STEPS), rec.final)
    u = log.update(6)
    assert all(u[n].dtype == torch.float32 for n in u)
    assert all(torch.equal(u[n], rec.params[7][n] - rec.params[6][n]) for n in u)


def test_theta_tau_minus_sum_of_updates(run):
    cfg, trainer, rec, log = run
    for s in (0, 5, 11):
        got = log.params_from(rec.final, STEPS, s)
        for n, v in got.items():  # a float sum: within rounding, not bit-exact in general
            assert torch.allclose(v, rec.params[s][n], rtol=0, atol=1e-6), (s, n)


def test_stored_batches_equal_reconstruction(run):
    cfg, trainer, rec, log = run
    recon = BatchReconstructor.from_log(log)
    for t in range(STEPS):
        stored, rebuilt = log.batches(t), recon.batches(t)
        assert len(stored) == len(rebuilt) == 1
        for a, b, c in zip(stored, rebuilt, rec.seen_batches[t]):
            assert a.keys() == b.keys() == c.keys()
            assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_sgd_momentum_replay_is_bit_exact(run):
    cfg, trainer, rec, log = run
    assert log.meta["optimizer"]["momentum"] == 0.9 and log.meta["optimizer_type"] == "SGD"
    steps = list(TrajectoryReplayer(log).iter_steps())
    assert [s.step for s in steps] == list(range(STEPS))
    assert steps[0].opt_state[next(iter(steps[0].opt_state))] == {}  # no momentum buffer before step 0
    for st in steps:
        assert equal_dicts(st.params, log.params_at(st.step))
        assert equal_dicts(st.params, rec.params[st.step])
        assert equal_dicts(st.grad, rec.grads[st.step])
        for n, d in rec.opt[st.step].items():
            assert equal_dicts(st.opt_state[n], d)
            if st.step > 0:
                assert "momentum_buffer" in d


def test_damaged_files_are_named_with_the_last_valid_step(run, tmp_path):
    cfg, trainer, rec, log = run
    bad = tmp_path / "log"
    shutil.copytree(log.log_dir, bad)
    # a flipped byte in the middle of steps.jsonl: everything from that line on is unusable, and it is
    # reported as damage in the middle (intact lines follow), not as a crash's torn tail
    data = bytearray((bad / "steps.jsonl").read_bytes())
    lines = bytes(data).splitlines(keepends=True)
    off = sum(len(x) for x in lines[:6]) + 20
    data[off] ^= 0x20
    (bad / "steps.jsonl").write_bytes(bytes(data))
    with pytest.raises(TrajectoryLogError, match=r"steps\.jsonl: line 7 is corrupted and \d+ intact line\(s\) follow "
                                                 r"it.*last valid step 5"):
        TrajectoryLog(bad)
    assert TrajectoryLog(bad, tolerant=True).steps == list(range(6))
    assert TrajectoryLog(bad, tolerant=True).tail.corrupt
    (bad / "steps.jsonl").write_bytes(b"".join(lines))
    # a truncated shard: refused at open; tolerant mode stops before its first step
    shards = sorted((bad / "tensors").iterdir())
    second = shards[1]
    first_step = int(second.name.split("-")[0])
    intact = second.read_bytes()
    second.write_bytes(intact[:-1000])
    with pytest.raises(TrajectoryLogError, match=rf"tensors/{second.name}: damaged tensor shard"):
        TrajectoryLog(bad)
    assert TrajectoryLog(bad, tolerant=True).last_step == first_step - 1
    second.write_bytes(intact)
    # a flipped bit inside tensor data: caught by the shard checksum when loaded
    third = shards[2]
    raw = bytearray(third.read_bytes())
    raw[-5] ^= 0x01
    third.write_bytes(bytes(raw))
    tl = TrajectoryLog(bad, tolerant=True)
    with pytest.raises(TrajectoryLogError, match="fails its checksum"):
        tl.update(int(third.name.split("-")[0]))


def test_light_logs_refuse_heavy_queries(tmp_path):
    cfg = rec_config(tmp_path, "training.max_steps=2", "training_logger.save_rng_state=false")
    train_capturing(cfg)
    log = TrajectoryLog(log_dir_of(cfg))
    assert b'"rng_seed":null' in (log.log_dir / "steps.jsonl").read_bytes()
    assert log.record(1).rng_seed == step_seed(cfg.training.seed, 1, 0)  # derived, as the trainer does
    for call in (lambda: log.params_at(1), lambda: log.batches(0), lambda: log.diag(0)):
        with pytest.raises(TrajectoryLogError, match="training_logger.storage="):
            call()


def test_a_failing_writer_stops_training_with_a_clear_error(tmp_path, monkeypatch):
    from lmcleaner.train import Trainer
    from lmcleaner.trajectory import writer

    def boom(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(writer, "write_bytes_atomic", boom)
    cfg = rec_config(tmp_path, "training.max_steps=12")
    trainer = Trainer(cfg)
    with pytest.raises(TrajectoryLogError, match="training log writer failed .*No space left on device"):
        trainer.train()
    assert trainer.state.step < 12
