"""The unlearning pipeline end to end on a tiny recorded run."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcleaner.cli.main import main
from lmcleaner.config import load_config
from lmcleaner.train import Trainer
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.forget_set import ForgetSetError, resolve_forget_ids
from lmcleaner.unlearn.session import UnlearnError, UnlearnSession

RUN = ["model=micro-llama", "training.num_samples=48", "training.batch_size=4", "training.max_steps=24",
       "training.progress_bar=false", "training.logging_steps=0", "training.optimizer=adamw",
       "training.learning_rate=3e-3", "training.max_grad_norm=0.5", "training_logger.checkpoint_interval=8"]
FORGET = [3, 17]


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlearn")
    Trainer(load_config(overrides=[*RUN, f"training.output_dir={root / 'run'}"])).train()
    return root / "run"


@pytest.fixture(scope="module")
def oracle(run_dir):
    out = run_dir.parent / "retrain"
    trainer = Trainer(retrain_config(run_dir, FORGET, out))
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.engine.trainable().items()}


def rel_error(params, theta, oracle):
    num = sum(((params[n].double() - oracle[n].double()) ** 2).sum() for n in oracle) ** 0.5
    den = sum(((theta[n].double() - oracle[n].double()) ** 2).sum() for n in oracle) ** 0.5
    return float(num / den)


def test_replay_is_bit_identical_to_retrain(run_dir, oracle):
    s = UnlearnSession(run_dir)
    res = s.run("replay", FORGET)
    assert res.params.keys() == oracle.keys()
    diff = {n: float((res.params[n] - oracle[n]).abs().max()) for n in oracle if not torch.equal(res.params[n], oracle[n])}
    assert not diff, diff
    assert res.info["recovery_steps"] == s.tau - res.info["restored_from"]


def test_lmcleaner_beats_baselines_and_moves_towards_oracle(run_dir, oracle):
    s = UnlearnSession(run_dir)
    theta = s.replayer.state_at(s.tau)[0]
    errors = {}
    for name, kw in [("LMCleanerSampleLevel", dict(hessian_mode="exact")), ("rollback", {}),
                     ("sgd_formula", dict(hessian_mode="exact"))]:
        errors[name] = rel_error(s.run(name, FORGET, **kw).params, theta, oracle)
    assert errors["LMCleanerSampleLevel"] < 0.5
    assert errors["LMCleanerSampleLevel"] < errors["rollback"]
    assert errors["LMCleanerSampleLevel"] < errors["sgd_formula"]


def test_cli_unlearn_writes_loadable_model_and_audit_and_leaves_source(run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    before = tree_hash(run_dir)
    out = tmp_path / "unlearned"
    rc = main(["unlearn", "trainer=LMCleanerSample", f"unlearn.model_dir={run_dir}", "unlearn.forget=3,17",
               f"unlearn.output_dir={out}", "trainer.method_args.K=8", "trainer.method_args.hessian_mode=GGN"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["forget_ids"] == FORGET and summary["K"] == 8
    model = AutoModelForCausalLM.from_pretrained(out)
    original = load_file(str(run_dir / "final_model" / "model.safetensors"))
    new = dict(model.named_parameters())
    assert any(not torch.equal(original[n], new[n].detach()) for n in original)
    records = json.loads((out / "audit" / "audit_records.json").read_text())
    rec = records[-1]
    for key in ("request_id", "forget_ids", "steps_touched", "method", "K", "hessian_mode", "injection_norms",
                "correction_norm", "seconds", "fingerprint_before", "fingerprint_after"):
        assert key in rec, key
    assert rec["fingerprint_before"] != rec["fingerprint_after"]
    assert tree_hash(run_dir) == before


@pytest.mark.parametrize("overrides, needle", [
    (["unlearn.forget=999"], "unknown sample ids"),
    (["trainer.method_args.K=0"], "K"),
    (["trainer.method_args.hessian_mode=bogus"], "hessian_mode"),
    (["trainer.method_args.hessian_mode=diag"], "diag"),
    (["trainer=bogus"], "unknown unlearning method"),
    (["trainer=replay", "trainer.method_args.K=5"], "replay has no argument"),
    (["trainer.method_args.K=abc"], "bad value"),
])
def test_bad_requests_fail_cleanly(run_dir, tmp_path, capsys, overrides, needle):
    out = tmp_path / "never"
    args = ["unlearn", "trainer=LMCleanerSample", f"unlearn.model_dir={run_dir}", "unlearn.forget=3",
            f"unlearn.output_dir={out}", *overrides]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_unused_sample_and_fingerprint_mismatch(run_dir, tmp_path):
    s = UnlearnSession(run_dir)
    unused = sorted(set(range(48)) - {i for st in s.log.steps for i in s.log.record(st).sample_ids})
    if unused:
        with pytest.raises(UnlearnError, match="never used"):
            s.run("LMCleanerSampleLevel", unused[:1])
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    meta_path = copy / "training_log" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["dataset_fingerprint"] = "0" * 32
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="fingerprint"):
        UnlearnSession(copy)


def test_forget_set_forms(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    assert resolve_forget_ids("3, 1,3") == [1, 3]
    assert resolve_forget_ids([5, 2]) == [2, 5]
    (tmp_path / "ids.txt").write_text("4\n7\n")
    assert resolve_forget_ids(str(tmp_path / "ids.txt")) == [4, 7]
    (tmp_path / "ids.json").write_text("[8, 9]")
    assert resolve_forget_ids(str(tmp_path / "ids.json")) == [8, 9]
    (tmp_path / "f.jsonl").write_text(json.dumps(rows[6]) + "\n" + json.dumps(rows[2]) + "\n")
    assert resolve_forget_ids(str(tmp_path / "f.jsonl"), rows) == [2, 6]
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "zzz", "answer": "a"}) + "\n")
    with pytest.raises(ForgetSetError, match="matches no training row"):
        resolve_forget_ids(str(tmp_path / "g.jsonl"), rows)
    with pytest.raises(ForgetSetError):
        resolve_forget_ids(None)


def test_divergence_guard_flags_a_broken_correction(run_dir):
    s = UnlearnSession(run_dir)
    theta = s.replayer.state_at(s.tau)[0]
    ok = s.retain_guard(theta, theta, FORGET)
    assert not ok["diverged"] and ok["retain_loss_before"] == ok["retain_loss_after"]
    g = torch.Generator().manual_seed(0)
    broken = {n: p + 0.5 * torch.randn(p.shape, generator=g) for n, p in theta.items()}
    bad = s.retain_guard(theta, broken, FORGET)
    assert bad["diverged"] and bad["retain_loss_after"] > bad["retain_loss_before"]
    res = s.run("LMCleanerSampleLevel", FORGET, hessian_mode="exact")
    assert "diverged" in res.info and "retain_loss_after" in res.info


def test_unused_ids_are_reported_not_fatal(tmp_path):
    root = tmp_path / "short"
    Trainer(load_config(overrides=[*RUN, f"training.output_dir={root}", "training.max_steps=5"])).train()
    s = UnlearnSession(root)
    used = sorted({i for st in s.log.steps for i in s.log.record(st).sample_ids})
    unused = sorted(set(range(48)) - set(used))
    res = s.run("rollback", [used[0], unused[0]])
    assert res.forget_ids == [used[0]] and res.info["unused_ids"] == [unused[0]]


def test_sample_used_before_the_window_is_refused(tmp_path):
    root = tmp_path / "win"
    Trainer(load_config(overrides=[*RUN, f"training.output_dir={root}", "training_logger.max_steps=6",
                                   "training_logger.checkpoint_interval=3"])).train()
    s = UnlearnSession(root)
    lo, hi = s.log.window
    assert lo > 0
    early = sorted(s.earliest_uses_before(set(range(48)), lo))
    assert early
    with pytest.raises(UnlearnError, match="before the replayable window"):
        s.run("LMCleanerSampleLevel", early[:1])


def test_diverged_correction_falls_back_to_replay(run_dir, oracle, monkeypatch):
    s = UnlearnSession(run_dir)
    real = s.retain_guard

    def always_diverged(theta, params, ids):
        return {**real(theta, params, ids), "diverged": True}

    monkeypatch.setattr(s, "retain_guard", always_diverged)
    kept = s.run("LMCleanerSampleLevel", FORGET, hessian_mode="exact")
    assert kept.method == "LMCleanerSampleLevel" and kept.info["diverged"]
    res = s.run("LMCleanerSampleLevel", FORGET, hessian_mode="exact", fallback_to_replay=True)
    assert res.method == "replay" and res.info["fallback_from"]["method"] == "LMCleanerSampleLevel"
    assert all(torch.equal(res.params[n], oracle[n]) for n in oracle)
