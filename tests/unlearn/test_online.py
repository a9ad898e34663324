"""Deletion requests arriving while training runs."""

import json

import pytest
import torch

from lmcleaner.config import load_config
from lmcleaner.train import Trainer
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.online import OnlineUnlearner
from lmcleaner.unlearn.session import UnlearnSession

RUN = ["model=micro-llama", "training.num_samples=40", "training.batch_size=4", "training.max_steps=20",
       "training.progress_bar=false", "training.logging_steps=0", "training.optimizer=sgd",
       "training.learning_rate=0.01", "training.max_grad_norm=0", "training.warmup_steps=0",
       "training_logger.checkpoint_interval=5"]
FORGET = [5, 11]
AT = 12  # the request arrives before step 12


class RequestAt:
    """Queue the request when the trainer reaches a step (the Python API path)."""

    def __init__(self, trainer, step, ids):
        self.trainer, self.step, self.ids = trainer, step, ids

    def wrap(self, unlearner):
        real = self.trainer._apply_requests

        def hook():
            if self.trainer.state.step == self.step and not self.trainer.state.processed_requests:
                self.trainer.request_forget(self.ids, request_id="r1")
            real()

        self.trainer._apply_requests = hook
        self.trainer.online_unlearner = unlearner


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.engine.trainable().items()}


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    base = Trainer(load_config(overrides=[*RUN, f"training.output_dir={root / 'base'}"]))
    base.train()
    oracle = Trainer(retrain_config(root / "base", FORGET, root / "retrain"))
    oracle.train()
    return params(oracle), params(base)


def test_online_replay_equals_retrain_bit_for_bit(tmp_path, retrained):
    oracle, _ = retrained
    trainer = Trainer(load_config(overrides=[*RUN, f"training.output_dir={tmp_path / 'run'}"]))
    RequestAt(trainer, AT, FORGET).wrap(OnlineUnlearner("replay"))
    state = trainer.train()
    assert state.unlearn_events and state.unlearn_events[0]["step"] == AT
    assert set(FORGET) <= set(state.excluded)
    final = params(trainer)
    assert all(torch.equal(final[n], oracle[n]) for n in oracle)
    # the event is in the trajectory, and a later request on this log stays exact
    session = UnlearnSession(tmp_path / "run")
    assert AT in session.log.event_steps
    later = session.run("replay", [7])
    assert later.params.keys() == final.keys()


def test_online_lmcleaner_close_to_counterfactual(tmp_path, retrained):
    oracle, original = retrained
    trainer = Trainer(load_config(overrides=[*RUN, f"training.output_dir={tmp_path / 'run'}"]))
    RequestAt(trainer, AT, FORGET).wrap(OnlineUnlearner("LMCleanerSampleLevel", K=800, hessian_mode="exact"))
    trainer.train()
    final = params(trainer)
    num = sum(float(((final[n] - oracle[n]).double() ** 2).sum()) for n in oracle) ** 0.5
    den = sum(float(((original[n] - oracle[n]).double() ** 2).sum()) for n in oracle) ** 0.5
    assert num / den < 0.5, num / den


def test_request_file_is_polled(tmp_path, retrained):
    oracle, _ = retrained
    req = tmp_path / "requests.jsonl"
    req.write_text("")
    trainer = Trainer(load_config(overrides=[*RUN, f"training.output_dir={tmp_path / 'run'}",
                                             f"training.forget_request_file={req}"]))
    real = trainer._apply_requests

    def hook():
        if trainer.state.step == AT:
            req.write_text(json.dumps({"request_id": "file-1", "ids": FORGET}) + "\n")
        real()

    trainer._apply_requests = hook
    trainer.online_unlearner = OnlineUnlearner("replay")
    state = trainer.train()
    assert state.processed_requests == ["file-1"]
    final = params(trainer)
    assert all(torch.equal(final[n], oracle[n]) for n in oracle)


def test_request_without_unlearner_is_an_error(tmp_path):
    from lmcleaner.train import TrainingError

    trainer = Trainer(load_config(overrides=[*RUN, f"training.output_dir={tmp_path / 'run'}"]))
    trainer.request_forget([1])
    with pytest.raises(TrainingError, match="online unlearner"):
        trainer.train()


ADAMW_RUN = [*[o for o in RUN if not o.startswith(("training.optimizer", "training.learning_rate",
                                                    "training.max_steps"))],
             "training.optimizer=adamw", "training.learning_rate=0.001", "training.max_steps=40"]


@pytest.mark.parametrize("method, kw", [("rollback", {}), ("LMCleanerSampleLevel", {"K": 3})])
def test_online_adamw_truncated_correction_keeps_a_sane_optimizer_state(tmp_path, method, kw):
    """Regression (issue 9): a truncated/rollback correction carried its dm, dv to tau without
    the beta decay of the real moments, and v + dv clamped at 0 made the next updates ~ lr m / eps
    (final parameter norm 1548 against 8.29 for exact replay). Training continued after the
    correction must stay on the scale of the exact answer."""
    def run(unlearner, out):
        trainer = Trainer(load_config(overrides=[*ADAMW_RUN, f"training.output_dir={out}"]))
        RequestAt(trainer, 20, FORGET).wrap(unlearner)
        trainer.train()
        opt = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
        ratio = max(float((st["exp_avg"].abs() / (st["exp_avg_sq"].sqrt() + 1e-8)).max())
                    for st in opt.state.values() if "exp_avg" in st)
        norm = sum(float((p.double() ** 2).sum()) for p in params(trainer).values()) ** 0.5
        return norm, ratio

    exact_norm, _ = run(OnlineUnlearner("replay"), tmp_path / "replay")
    norm, ratio = run(OnlineUnlearner(method, **kw), tmp_path / "approx")
    assert abs(norm - exact_norm) / exact_norm < 0.05, (norm, exact_norm)
    assert ratio < 10, ratio  # |m| / sqrt(v) of a real Adam state is bounded (~7.3 for the default betas)


def test_request_file_appended_during_a_cli_run(tmp_path, retrained, monkeypatch):
    """`lmcleaner train training.forget_request_file=... training.online_unlearning.method=replay`: a line
    appended to the file while the run trains (here, deterministically, right before step AT) is applied."""
    from lmcleaner.cli.main import main
    from lmcleaner.train.trainer import Trainer as T

    oracle, _ = retrained
    requests = tmp_path / "requests.jsonl"
    requests.write_text("")
    real_poll = T._poll_request_file
    appended = []

    def poll(self):
        if self.state.step == AT and not appended:
            with open(requests, "a") as f:
                f.write(json.dumps({"request_id": "r1", "ids": FORGET}) + "\n")
            appended.append(AT)
        return real_poll(self)

    monkeypatch.setattr(T, "_poll_request_file", poll)
    out = tmp_path / "run"
    assert main(["train", *RUN, f"training.output_dir={out}", f"training.forget_request_file={requests}",
                 "training.online_unlearning.method=replay"]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["processed_requests"] == ["r1"] and state["unlearn_events"][0]["step"] == AT
    from safetensors.torch import load_file

    final = load_file(str(out / "final_model" / "model.safetensors"))
    assert all(torch.equal(final[n], oracle[n]) for n in oracle)


def test_request_file_without_a_method_is_a_one_line_error(tmp_path, capsys):
    from lmcleaner.cli.main import main

    code = main(["train", *RUN, f"training.output_dir={tmp_path / 'run'}",
                 f"training.forget_request_file={tmp_path / 'r.jsonl'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "training.online_unlearning.method" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_online_lmcleaner_resynchronises_the_optimizer_state(tmp_path):
    """Online, the linear propagation replays its last steps exactly from the corrected state
    (``tail``, automatic: the momentum horizon): the first moment is rebuilt from gradients at
    the corrected parameters, the residual that continued training grows (benchmarks/online.py).
    Against retraining, the final error is below that of the plain propagation (tail=0), at the
    recorded curvature point (the midpoint's own residual is smaller: there the tail matters less)."""
    oracle_run = Trainer(load_config(overrides=[*ADAMW_RUN, f"training.output_dir={tmp_path / 'o'}",
                                                f"training.exclude_ids={FORGET}", "training_logger.enabled=false"]))
    oracle_run.train()
    oracle = params(oracle_run)

    def run(out, **kw):
        trainer = Trainer(load_config(overrides=[*ADAMW_RUN, f"training.output_dir={tmp_path / out}"]))
        RequestAt(trainer, 20, FORGET).wrap(OnlineUnlearner("LMCleanerSampleLevel", curvature_point="recorded", **kw))
        state = trainer.train()
        final = params(trainer)
        return sum(float(((final[n] - oracle[n]).double() ** 2).sum()) for n in oracle) ** 0.5, state

    with_tail, state = run("auto")
    without, _ = run("plain", tail=0)
    session = UnlearnSession(tmp_path / "auto")
    uses = session.log.steps_containing(FORGET)
    event = state.unlearn_events[0]
    assert event["step"] == 20
    # beta1 = 0.9: 22 steps, at most those after the first use (the propagation keeps that step)
    assert event["tail_steps"] == min(22, 20 - uses[0] - 1)
    assert with_tail < without, (with_tail, without)


def test_online_correction_flagged_by_its_estimate_falls_back_to_replay(tmp_path, retrained, monkeypatch):
    """A correction whose own estimate says it is no better than doing nothing never reaches the
    live model: the request is answered by exact replay (bit-identical to retraining) and the
    event records the fallback; ``fallback_to_replay=False`` keeps the correction."""
    from lmcleaner.unlearn.handlers._correction import CorrectionMethod

    real = CorrectionMethod._estimate

    def pessimistic(self, *args, **kwargs):
        return {**real(self, *args, **kwargs), "estimated_error": 5.0}

    monkeypatch.setattr(CorrectionMethod, "_estimate", pessimistic)
    oracle, _ = retrained
    trainer = Trainer(load_config(overrides=[*RUN, f"training.output_dir={tmp_path / 'run'}"]))
    RequestAt(trainer, AT, FORGET).wrap(OnlineUnlearner("LMCleanerSampleLevel", K=3))
    state = trainer.train()
    event = state.unlearn_events[0]
    assert event["fallback_from"]["method"] == "LMCleanerSampleLevel"
    final = params(trainer)
    assert all(torch.equal(final[n], oracle[n]) for n in oracle)

    kept = Trainer(load_config(overrides=[*RUN, f"training.output_dir={tmp_path / 'kept'}"]))
    RequestAt(kept, AT, FORGET).wrap(OnlineUnlearner("LMCleanerSampleLevel", fallback_to_replay=False, K=3))
    event = kept.train().unlearn_events[0]
    assert event["diverged"] and not event.get("fallback_from")
    assert not all(torch.equal(p, oracle[n]) for n, p in params(kept).items())


def test_requests_pending_at_one_step_share_one_correction(tmp_path, retrained):
    """Two requests that arrive before the same step are answered by one joint correction (one
    replay for both), each with its own event naming the other; the run ends bit-identical to
    retraining without all their samples, and the log stays replayable."""
    oracle, _ = retrained
    trainer = Trainer(load_config(overrides=[*RUN, f"training.output_dir={tmp_path / 'run'}"]))
    calls = []

    class Counting(OnlineUnlearner):
        def __call__(self, trainer, ids, step):
            calls.append((list(ids), step))
            return super().__call__(trainer, ids, step)

    real = trainer._apply_requests

    def hook():
        if trainer.state.step == AT and not trainer.state.processed_requests:
            trainer.request_forget([FORGET[0]], request_id="a")
            trainer.request_forget([FORGET[1]], request_id="b")
        real()

    trainer._apply_requests = hook
    trainer.online_unlearner = Counting("replay")
    state = trainer.train()
    assert calls == [(sorted(FORGET), AT)]
    events = {e["request_id"]: e for e in state.unlearn_events}
    assert events["a"]["ids"] == [FORGET[0]] and events["a"]["joint_with"] == ["b"]
    assert events["b"]["ids"] == [FORGET[1]] and events["b"]["joint_with"] == ["a"]
    final = params(trainer)
    assert all(torch.equal(final[n], oracle[n]) for n in oracle)
    later = UnlearnSession(tmp_path / "run").run("replay", [7])
    assert later.params.keys() == final.keys()


@pytest.mark.parametrize("method,extra,expected", [
    ("auto", [], {}),  # auto's own first window (40), not LMCleaner's propagation window 800
    ("auto", ["training.online_unlearning.K=12"], {"K": 12}),
    ("LMCleanerSample", [], {}),  # LMCleaner's own defaults (K=800, exact, 1e-4)
    ("LMCleanerSample", ["training.online_unlearning.K=7", "training.online_unlearning.hessian_mode=diag"],
     {"K": 7, "hessian_mode": "diag"}),
    ("replay", ["training.online_unlearning.K=7"], {}),  # replay takes no window
])
def test_configured_online_method_gets_only_the_keys_set(tmp_path, method, extra, expected):
    from lmcleaner.train.trainer import _configured_unlearner
    from lmcleaner.unlearn.registry import get_method, method_config

    cfg = load_config(overrides=[*RUN, f"training.output_dir={tmp_path}", f"training.online_unlearning.method={method}",
                                 *extra])
    unlearner = _configured_unlearner(cfg.training)
    assert unlearner.method_args == expected
    cls = get_method(method)
    if method == "auto":  # what the method will actually run with
        assert method_config(cls, unlearner.method_args).K == expected.get("K", 40)


def test_default_online_unlearner_is_auto_and_records_its_choice(tmp_path, retrained):
    """``OnlineUnlearner()`` is ``auto``, like ``lmcleaner unlearn``: its event says what it chose;
    when that is replay the run ends bit-identical to retraining without the samples."""
    oracle, _ = retrained
    unlearner = OnlineUnlearner()
    assert unlearner.method == "auto"
    trainer = Trainer(load_config(overrides=[*RUN, f"training.output_dir={tmp_path / 'run'}"]))
    RequestAt(trainer, AT, FORGET).wrap(unlearner)
    state = trainer.train()
    event = state.unlearn_events[0]
    assert event["method"] == "auto" and event["chosen"] in ("replay", "LMCleanerSampleLevel")
    assert {c["method"] for c in event["auto"]["candidates"]} >= {"replay"}
    final = params(trainer)
    if event["chosen"] == "replay":
        assert all(torch.equal(final[n], oracle[n]) for n in oracle)
    else:
        assert event["estimated_error"] <= event["auto"]["max_error"]
