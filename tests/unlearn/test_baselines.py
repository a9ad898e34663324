"""The fine-tuning baselines (GradAscent, GradDiff, NPO, SimNPO): losses against hand-computed
values, the optimisation loop (determinism, micro-batching, cost), the CLI and the registry."""

from __future__ import annotations

import json
import math
from functools import lru_cache

import pytest
import torch
from safetensors.torch import load_file

from lmcleaner.cli.main import main
from lmcleaner.data.collate import Collator
from lmcleaner.train.loss import IGNORE_INDEX
from lmcleaner.unlearn.registry import describe_methods, get_method, method_config
from lmcleaner.unlearn.session import UnlearnSession

from .conftest import one_thread
from .unlearn_harness import tiny_llama

FORGET_ROWS = [([5, 9, 3, 17, 22, 8], [IGNORE_INDEX, IGNORE_INDEX, 3, 17, 22, 8]),
               ([4, 30, 12, 1], [IGNORE_INDEX, 30, 12, 1])]
RETAIN_ROWS = [([7, 7, 2, 19, 25], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 19, 25]),
               ([11, 6, 28, 14, 3, 3, 9], [IGNORE_INDEX, 6, 28, 14, 3, 3, 9])]
FORGET = [3, 17]


# ------------------------------------------------------------------ hand computation
@lru_cache(maxsize=1)
def _models():
    torch.manual_seed(0)
    model = tiny_llama(layers=1, attn="eager").eval()
    with torch.no_grad():
        for p in model.parameters():  # far from uniform predictions, so every term is O(1)
            p.normal_(0.0, 0.5)
    ref = tiny_llama(layers=1, attn="eager").eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model, ref


def _log_probs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def _by_hand(model, rows):
    """Per row: (sum of log p(answer token), number of answer tokens), one unpadded row at a time."""
    out = []
    for ids, labels in rows:
        logp = _log_probs(model, ids)
        picked = [float(logp[t, labels[t + 1]]) for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]
        out.append((sum(picked), len(picked)))
    return out


def _kl_by_hand(model, ref, rows):
    """Sum over answer positions of KL(p_ref || p_model), and the number of positions."""
    total, n = 0.0, 0
    for ids, labels in rows:
        logp, logr = _log_probs(model, ids), _log_probs(ref, ids)
        for t in range(len(ids) - 1):
            if labels[t + 1] != IGNORE_INDEX:
                total += float((logr[t].exp() * (logr[t] - logp[t])).sum())
                n += 1
    return total, n


def _batch(rows):
    return Collator(0)([{"input_ids": i, "labels": lab, "sample_id": k} for k, (i, lab) in enumerate(rows)])


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("method, args", [
    ("GradAscent", {}),
    ("GradDiff", {"gamma": 0.7, "alpha": 1.3}),
    ("GradDiff", {"gamma": 0.7, "alpha": 1.3, "retain_loss": "KL"}),
    ("NPO", {"beta": 0.1}),
    ("NPO", {"beta": 0.8, "gamma": 0.5, "alpha": 2.0, "retain_loss": "KL"}),
    ("SimNPO", {}),
    ("SimNPO", {"beta": 2.0, "delta": 3.3, "gamma": 1.0, "alpha": 0.5}),
])
def test_objective_matches_hand_computed_value(method, args):
    model, ref = _models()
    cls = get_method(method)
    cfg = method_config(cls, args)
    f, r = _by_hand(model, FORGET_ROWS), _by_hand(model, RETAIN_ROWS)
    gamma, alpha = getattr(cfg, "gamma", 1.0), getattr(cfg, "alpha", 0.0)
    if method in ("GradAscent", "GradDiff"):
        forget = sum(lp for lp, _ in f) / sum(n for _, n in f)  # minus the token-mean NLL
    elif method == "NPO":  # (2/beta) log(1 + (pi / pi_ref)^beta), the paper's form
        fr = _by_hand(ref, FORGET_ROWS)
        forget = sum(2 / cfg.beta * _softplus(cfg.beta * (lp - lr)) for (lp, _), (lr, _) in zip(f, fr)) / len(f)
    else:  # -(2/beta) logsigmoid(-(beta/|y|) log pi - beta delta)
        forget = sum(2 / cfg.beta * _softplus(cfg.beta * lp / n + cfg.beta * cfg.delta) for lp, n in f) / len(f)
    expected = gamma * forget
    if alpha:
        if cfg.retain_loss == "KL":
            kl, n = _kl_by_hand(model, ref, RETAIN_ROWS)
            expected += alpha * kl / n
        else:
            expected += alpha * -sum(lp for lp, _ in r) / sum(n for _, n in r)
    with torch.no_grad():
        got = float(cls().objective(cfg, model, ref, _batch(FORGET_ROWS), _batch(RETAIN_ROWS)))
    assert abs(expected) > 0.05
    assert got == pytest.approx(expected, rel=2e-5, abs=1e-6)


@pytest.mark.usefixtures("single_thread")
def test_npo_at_the_reference_is_2_log2_over_beta_with_the_gradient_of_summed_nll():
    model, _ = _models()
    npo, ga = get_method("NPO")(), get_method("GradAscent")()
    cfg = method_config("NPO", {"beta": 0.1, "alpha": 0.0})
    loss = npo.objective(cfg, model, model, _batch(FORGET_ROWS))
    assert float(loss.detach()) == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)
    g_npo = torch.autograd.grad(loss, list(model.parameters()))
    # at pi = pi_ref the weight 2 sigmoid(0) = 1: the gradient is -(1/rows) sum_i grad nll_i, i.e.
    # GradAscent's (-sum nll / tokens) rescaled to -sum nll / rows
    n_tokens = sum(n for _, n in _by_hand(model, FORGET_ROWS))
    ga_loss = ga.objective(method_config("GradAscent"), model, None, _batch(FORGET_ROWS)) * n_tokens / 2
    g_ga = torch.autograd.grad(ga_loss, list(model.parameters()))
    for a, b in zip(g_npo, g_ga):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ optimisation loop
@pytest.fixture(scope="module")
def session(recorded_run):
    with one_thread():
        yield UnlearnSession(recorded_run)


def _forget_nll(session, params):
    model = session.model_with(params).eval()
    batch = Collator(session.trainer.dataset.pad_token_id)([session.trainer.dataset[i] for i in FORGET])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        from lmcleaner.train.loss import token_nll_sum

        return float(token_nll_sum(out.logits, batch["labels"]))


def test_loop_is_deterministic_and_micro_batching_does_not_change_the_result(session):
    kw = {"lr": 1.0, "lr_relative": True, "epochs": 3, "retain_loss": "KL"}
    with one_thread():
        a = session.run("GradDiff", FORGET, **kw)
        b = session.run("GradDiff", FORGET, **kw)
        c = session.run("GradDiff", FORGET, micro_batch_size=1, **kw)
        d = session.run("GradDiff", FORGET, seed=1, **kw)
    assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    assert all(torch.allclose(a.params[n], c.params[n], rtol=1e-4, atol=1e-6) for n in a.params)
    assert any(not torch.equal(a.params[n], d.params[n]) for n in a.params)  # other retain draws
    theta = session.replayer.state_at(session.tau)[0]
    assert any(not torch.equal(a.params[n], theta[n]) for n in theta)
    assert a.info["retain_pool_rows"] == len(session.trainer.dataset) - len(FORGET)
    assert a.info["lrs"][0] == pytest.approx(3e-3) and a.info["updates"] == 3


# ------------------------------------------------------------------ command line
@pytest.mark.parametrize("method, per_row", [("GradAscent", 1), ("GradDiff", 2), ("NPO", 2 + 1 / 3),
                                             ("SimNPO", 1)])
def test_cli_unlearn_runs_each_baseline(recorded_run, session, tmp_path, capsys, method, per_row):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    # The run is barely trained (answer NLL ~6.2/token): at delta=0 SimNPO's beta=4.5 saturates the sigmoid and
    # its gamma=0.125 forget term loses to the retain term; check the direction of the forget term alone.
    extra = ["trainer.method_args.delta=6.5", "trainer.method_args.alpha=0"] if method == "SimNPO" else []
    rc = main(["unlearn", f"trainer={method}", f"unlearn.model_dir={recorded_run}", "unlearn.forget=3,17",
               f"unlearn.output_dir={out}", "trainer.method_args.lr=1.0", "trainer.method_args.lr_relative=true",
               "trainer.method_args.epochs=3", *extra])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == method and summary["forget_ids"] == FORGET
    # 2 forget rows (+ 2 retain rows unless alpha=0) per update, 3 updates, training batch 4; NPO's reference forward = 1/3
    assert summary["grad_equivalents_total"] == pytest.approx(3 * 2 * per_row / 4)
    rec = json.loads((out / "audit" / "audit_records.json").read_text())[-1]
    for key in ("grad_equivalents", "grad_equivalents_total", "seconds", "recovery_steps", "steps_touched",
                "retain_loss_before", "retain_loss_after", "lrs", "updates"):
        assert key in rec, key
    assert rec["method"] == method and rec["fingerprint_before"] != rec["fingerprint_after"]
    assert rec["forget_term_last"] < rec["forget_term_first"]  # same 2 forget rows every step (retain rows vary)
    model = AutoModelForCausalLM.from_pretrained(out)
    params = {n: p.detach() for n, p in model.named_parameters()}
    original = load_file(str(recorded_run / "final_model" / "model.safetensors"))
    assert _forget_nll(session, {n: params[n] for n in original}) > _forget_nll(session, original)


# ------------------------------------------------------------------ registry
def test_registry_aliases_and_defaults():
    for alias, name in [("grad_diff", "GradDiff"), ("npo", "NPO"), ("simnpo", "SimNPO"), ("grad_ascent", "GradAscent")]:
        assert get_method(alias).name == name
    npo, sim, gd = method_config("NPO"), method_config("SimNPO"), method_config("GradDiff")
    assert (npo.beta, npo.gamma, npo.alpha, npo.retain_loss) == (0.1, 1.0, 1.0, "NLL")
    assert (sim.beta, sim.delta, sim.gamma, sim.alpha) == (4.5, 0.0, 0.125, 1.0)
    assert (gd.lr, gd.epochs, gd.batch_size, gd.optimizer, gd.weight_decay) == (1e-5, 10, 32, "adamw", 0.01)
    text = describe_methods()
    assert "NPO (alias npo)" in text and "beta=0.1" in text and "beta=4.5" in text and "retain_loss=NLL" in text


def test_help_and_readme_list_every_registered_method(capsys):
    from pathlib import Path

    from lmcleaner.cli.main import OVERRIDES_HELP
    from lmcleaner.unlearn.registry import method_names

    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = capsys.readouterr().out
    assert all(m in text for m in ("GradAscent", "GradDiff", "NPO", "SimNPO"))
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in method_names():
        names = {name, *get_method(name).aliases}
        assert any(n in OVERRIDES_HELP for n in names), name
        assert any(f"`{n}`" in readme for n in names), name


@pytest.mark.parametrize("overrides, needle", [
    (["trainer=NPO", "trainer.method_args.K=5"], "NPO has no argument 'K'"),
    (["trainer=GradAscent", "trainer.method_args.alpha=1"], "GradAscent has no argument 'alpha'"),
    (["trainer=SimNPO", "trainer.method_args.beta=0"], "beta"),
    (["trainer=GradDiff", "trainer.method_args.retain_loss=MSE"], "retain_loss"),
    (["trainer=npo", "trainer.method_args.lr=abc"], "bad value"),
    (["trainer=GradDiff", "trainer.method_args.optimizer=lion"], "optimizer"),
])
def test_bad_baseline_arguments_fail_in_one_line(tmp_path, capsys, overrides, needle):
    out = tmp_path / "never"
    rc = main(["unlearn", f"unlearn.model_dir={tmp_path / 'no-run'}", "unlearn.forget=3", f"unlearn.output_dir={out}",
               *overrides])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()
