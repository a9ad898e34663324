"""Certification through the session and the CLI on a tiny recorded run (clipped plain SGD)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmcleaner.cli.main import main
from lmcleaner.config import load_config
from lmcleaner.train import Trainer
from lmcleaner.unlearn.certify import GaussianNoise, NoFormalBound, analytic_sigma
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.session import UnlearnError, UnlearnSession

RUN = ["model=micro-llama", "training.num_samples=40", "training.batch_size=4", "training.max_steps=20",
       "training.progress_bar=false", "training.logging_steps=0", "training.optimizer=sgd", "training.momentum=0",
       "training.learning_rate=0.05", "training.max_grad_norm=0.5", "training_logger.checkpoint_interval=5",
       "training.torch_threads=1"]
FORGET = [3, 17]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("certify")
    Trainer(load_config(overrides=[*RUN, f"training.output_dir={root / 'run'}"])).train()
    return root / "run"


@pytest.fixture(scope="module")
def session(run_dir):
    return UnlearnSession(run_dir)


@pytest.fixture(scope="module")
def corrected(session):
    return session.run("LMCleanerSampleLevel", FORGET, K=6)


@pytest.fixture(scope="module")
def oracle(run_dir):
    trainer = Trainer(retrain_config(run_dir, FORGET, run_dir.parent / "retrain"))
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.engine.trainable().items()}


def _dist(a, b) -> float:
    return math.sqrt(sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in b))


def test_formal_certificate_holds_and_is_reproducible_from_the_audit(session, corrected, oracle):
    from lmcleaner.unlearn.certify import certify_result

    cert = certify_result(session, corrected, {"epsilon": 1.0, "delta": 1e-5})
    c = cert.info["certification"]
    assert c["guarantee"] == "formal" and c["assumptions"] == [] and c["mode"] == "isotropic"
    assert "worst case" in c["bound_source"] and "no assumption" in c["bound_source"]
    # the proven bound holds on the real trainer's run against exact retraining
    assert _dist(corrected.params, oracle) <= c["bound"]
    assert c["sigma"] == pytest.approx(analytic_sigma(1.0, 1e-5, c["bound"]))
    # reproducible: the recorded seed regenerates the very same noise
    again = certify_result(session, corrected, {"epsilon": 1.0, "delta": 1e-5, "seed": c["noise_seed"]})
    assert all(torch.equal(again.params[n], cert.params[n]) for n in cert.params)
    noise = GaussianNoise(c["sigma"], seed=c["noise_seed"]).sample(corrected.params)
    assert all(torch.allclose(cert.params[n], corrected.params[n] + noise[n], atol=1e-6) for n in noise)
    assert c["noise_norm"] == pytest.approx(math.sqrt(sum(float((t ** 2).sum()) for t in noise.values())),
                                            rel=1e-4)
    # an assumption buys a smaller bound, and says so; it is stated for the recorded curvature point
    # (this clipped run takes the midpoint by default, whose map moves its curvature with d)
    assert corrected.info["curvature_point"] == "midpoint"
    with pytest.raises(NoFormalBound, match="curvature_point=recorded"):
        certify_result(session, corrected, {"epsilon": 1.0, "assume": "lipschitz", "seed": 1})
    recorded = session.run("LMCleanerSampleLevel", FORGET, K=6, curvature_point="recorded")
    lip = certify_result(session, recorded, {"epsilon": 1.0, "assume": "lipschitz", "seed": 1})
    lc = lip.info["certification"]
    assert lc["bound"] < c["bound"] and "not proven" in lc["assumptions"][0]


def test_cli_certify_writes_the_audit_fields(run_dir, tmp_path, capsys):
    out = tmp_path / "certified"
    rc = main(["unlearn", "trainer=LMCleanerSample", f"unlearn.model_dir={run_dir}", "unlearn.forget=3,17",
               f"unlearn.output_dir={out}", "trainer.method_args.K=4", "trainer.method_args.certify.epsilon=2",
               "trainer.method_args.certify.delta=1e-6", "trainer.method_args.certify.seed=7"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["certification"]
    rec = json.loads((out / "audit" / "audit_records.json").read_text())[-1]["certification"]
    for key in ("guarantee", "epsilon", "delta", "sigma", "bound", "bound_source", "noise_seed"):
        assert key in rec and rec[key] == printed[key], key
    assert rec["guarantee"] == "formal" and rec["epsilon"] == 2 and rec["delta"] == 1e-6 and rec["noise_seed"] == 7


def test_unclipped_run_has_no_formal_bound(session, corrected, oracle, monkeypatch):
    from lmcleaner.unlearn.certify import certify_result

    monkeypatch.setattr(session.spec, "max_grad_norm", None)
    with pytest.raises(NoFormalBound, match="not clipped.*bound=empirical") as err:
        certify_result(session, corrected, {"epsilon": 1.0})
    assert "\n" not in str(err.value)
    res = certify_result(session, corrected, {"epsilon": 1.0, "bound": "formal_or_empirical", "seed": 3})
    c = res.info["certification"]
    assert c["guarantee"] == "empirical" and "not clipped" in c["formal_unavailable"]
    assert "measured" in c["bound_source"] and c["replayed_steps"] > 0
    assert c["bound"] == pytest.approx(_dist(corrected.params, oracle), rel=1e-4)  # replay = retraining


def test_methods_without_a_formal_bound_and_exact_methods(session, oracle):
    with pytest.raises(UnlearnError, match="no formal bound for method GradAscent"):
        session.run("GradAscent", FORGET, certify={"epsilon": 1.0})
    exact = session.run("replay", FORGET, certify={"epsilon": 1.0})
    assert exact.info["certification"]["bound"] == 0.0 and exact.info["certification"]["sigma"] == 0.0
    assert all(torch.equal(exact.params[n], oracle[n]) for n in oracle)


def test_empirical_subspace_noise(session, corrected, oracle):
    from lmcleaner.unlearn.certify import certify_result

    res = certify_result(session, corrected, {"epsilon": 1.0, "bound": "empirical", "subspace_rank": 4,
                                              "seed": 0, "curvature_rows": 8, "lanczos_iters": 4}, oracle=oracle)
    c = res.info["certification"]
    assert c["guarantee"] == "empirical" and c["mode"] == "subspace" and c["subspace_rank"] == 4
    assert c["bound"] == pytest.approx(_dist(corrected.params, oracle), rel=1e-4)
    assert math.hypot(c["bound_parallel"], c["bound_perpendicular"]) == pytest.approx(c["bound"], rel=1e-4)
    s1 = analytic_sigma(1.0, 1e-5)
    assert (c["bound_parallel"] / c["sigma"]) ** 2 + (c["bound_perpendicular"] / c["sigma_perp"]) ** 2 == \
        pytest.approx(1 / s1 ** 2, rel=1e-6)
    with pytest.raises(UnlearnError, match="batch-level"):
        batch = session.run("LMCleanerBatchLevel", FORGET, K=4)
        certify_result(session, batch, {"epsilon": 1.0, "bound": "empirical"})


def test_windowed_replay_and_auto(session, corrected, oracle):
    """The windowed correction (propagation=replay) equals retraining through its first window, so its
    formal bound starts there and is below the linear correction's; auto is certified by its choice."""
    from lmcleaner.unlearn.certify import certify_result

    windowed = session.run("LMCleanerSampleLevel", FORGET, propagation="replay", K=4, carry="frozen")
    cert = certify_result(session, windowed, {"epsilon": 1.0, "seed": 0}).info["certification"]
    linear = certify_result(session, corrected, {"epsilon": 1.0, "seed": 0}).info["certification"]
    assert cert["guarantee"] == "formal"
    assert cert["bound_details"]["exact_until"] == windowed.info["windows"][0]["end"] > min(windowed.info["steps_touched"])
    assert _dist(windowed.params, oracle) <= cert["bound"] < linear["bound"]
    with pytest.raises(NoFormalBound, match="carry=momentum"):
        certify_result(session, session.run("LMCleanerSampleLevel", FORGET, propagation="replay", K=4,
                                            carry="momentum"), {"epsilon": 1.0})
    auto = session.run("auto", FORGET, certify={"epsilon": 1.0, "seed": 0})
    c = auto.info["certification"]
    assert c["guarantee"] == "formal" and (c["sigma"] == 0.0) == (auto.info["chosen"] == "replay")


def test_linear_correction_with_an_exact_tail_has_no_formal_bound(session):
    """The formal bound follows the linear propagation up to tau; a correction whose last steps were
    replayed from its corrected state (``tail``, online by default) is not covered by it."""
    from lmcleaner.unlearn.certify import certify_result

    tailed = session.run("LMCleanerSampleLevel", FORGET, tail=2)
    assert tailed.info["tail_steps"] == 2
    with pytest.raises(NoFormalBound, match="exact tail"):
        certify_result(session, tailed, {"epsilon": 1.0})
    empirical = certify_result(session, tailed, {"epsilon": 1.0, "bound": "formal_or_empirical", "seed": 1})
    assert empirical.info["certification"]["guarantee"] == "empirical"
