"""Mixture of experts: top-k routing, router losses in the step loss, and unlearning that sees them.

A tiny Mixtral (4 experts, top-2) trained with load-balance, balance-deviation
and z-loss terms: exact replay must still equal retraining bit for bit, and
LMCleaner's gradient, injection and curvature must be those of the whole
training loss (checked against the training engine's own autograd and finite
differences).
"""

from __future__ import annotations

import math

import pytest
import torch

from lmcleaner.config import load_config
from lmcleaner.train import Trainer, compute_router_auxiliary_loss
from lmcleaner.train.engine import run_step
from lmcleaner.train.loss import token_nll_sum
from lmcleaner.train.router import RouterAux
from lmcleaner.trajectory.replay import _Capture
from lmcleaner.unlearn.cli_retrain import retrain_config
from lmcleaner.unlearn.functional import DataParallel, FunctionalLM, removal_injection, to_compute
from lmcleaner.unlearn.hvp import make_hvp_backend
from lmcleaner.unlearn.methods import sample_counterfactual_batches
from lmcleaner.unlearn.session import UnlearnSession

RUN = ["model=tiny-mixtral", "training.num_samples=32", "training.batch_size=4",
       "training.gradient_accumulation_steps=2", "training.max_steps=10", "training.progress_bar=false",
       "training.logging_steps=0", "training.torch_threads=1", "training.optimizer=sgd",
       "training.learning_rate=3e-2", "training.max_grad_norm=0", "training.load_balance_coef=0.5",
       "training.auxiliary_coef=0.5", "training.z_loss_coef=0.01", "training_logger.checkpoint_interval=4"]
FORGET = [3, 17]


def test_router_losses_by_hand_top2_and_mask():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [3.0, 1.0, 0.5], [9.0, 9.0, 9.0]])
    mask = torch.tensor([1, 1, 1, 0])  # the last token is padding: it must not count
    out = compute_router_auxiliary_loss([logits], load_balance_coef=0.5, auxiliary_coef=2.0, z_loss_coef=0.1,
                                        top_k=2, token_mask=mask)
    p = logits[:3].softmax(-1)
    # top-2 picks {0, 2}, {2, 1}, {0, 1}: 6 assignments
    f = torch.tensor([2 / 6, 2 / 6, 2 / 6])
    lb = 3 * (f * p.mean(0)).sum()
    z = (torch.logsumexp(logits[:3], -1) ** 2).mean()
    assert torch.allclose(out["load_balance"], lb) and torch.allclose(out["z_loss"], z)
    assert math.isclose(float(out["auxiliary"]), 0.0, abs_tol=1e-12)
    top1 = compute_router_auxiliary_loss([logits[:3]], top_k=1)["load_balance"]
    assert not torch.allclose(top1, out["load_balance"])  # top-k changes the assignment fractions


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    cfg = load_config(overrides=[*RUN, f"training.output_dir={root / 'run'}"])
    trainer = Trainer(cfg)
    gate = trainer.engine.unwrapped.model.layers[0].mlp.gate
    assert gate.top_k == 2 and trainer.engine.router_aux.top_k == 2
    trainer.train()
    oracle = Trainer(retrain_config(root / "run", FORGET, root / "retrain"))
    oracle.train()
    return root / "run", {n: p.detach().clone() for n, p in oracle.engine.trainable().items()}


def _rel(a: dict, b: dict) -> float:
    num = sum(((a[n].double() - b[n].double()) ** 2).sum() for n in b)
    return float(num.sqrt() / sum((b[n].double() ** 2).sum() for n in b).sqrt())


def test_moe_top2_replay_equals_retrain(moe_run):
    run_dir, oracle = moe_run
    s = UnlearnSession(run_dir)
    assert s.router_aux == RouterAux(num_experts=4, top_k=2, load_balance_coef=0.5, auxiliary_coef=0.5,
                                     z_loss_coef=0.01)
    res = s.run("replay", FORGET)
    assert res.params.keys() == oracle.keys()
    assert all(torch.equal(res.params[n], oracle[n]) for n in oracle)


def _first_injection_step(run_dir):
    """(session, the replayed step that first uses FORGET, its float32 params, its normaliser)."""
    torch.set_num_threads(1)
    s = UnlearnSession(run_dir)
    t = s.log.steps_containing(FORGET)[0]
    st = next(s.replayer.iter_steps(t, t + 1))
    return s, st, to_compute(st.params), st.record.normaliser


def test_moe_gradient_injection_and_curvature_include_router_losses(moe_run):
    s, st, params, n = _first_injection_step(moe_run[0])
    rep, forget, t = s.replayer, set(FORGET), st.step
    fl = FunctionalLM(s.template, st.params.keys(), router=s.router_aux)
    dense = FunctionalLM(s.template, st.params.keys())  # NLL only: what unlearning differentiated before
    # The training engine's own autograd of the counterfactual step (samples removed, N and M+ recomputed).
    rep.seek(t)
    cap = _Capture(rep.engine.trainable(), grads=True)
    rec = s.log.record(t)
    run_step(rep.engine, t, rec.epoch, rec.micro_batches, set(rec.excluded) | forget, cap)
    rep._pos = rep._origin = None
    engine_injection = {k: cap.grads[k] - st.grad[k] for k in st.grad}
    with fl.curvature_mode():
        assert _rel(fl.grad(params, st.batches, n), st.grad) < 1e-5
        assert _rel(dense.grad(params, st.batches, n), st.grad) > 1e-2  # the router term matters here
        assert _rel(removal_injection(fl, params, st.batches, forget, n), engine_injection) < 1e-4
        assert _rel(removal_injection(dense, params, st.batches, forget, n), engine_injection) > 1e-2
        # the recorded loss is the NLL part; the step loss adds the router term
        assert math.isclose(float(dense.loss(params, st.batches, n)), rec.loss, rel_tol=1e-5)
        assert float(fl.loss(params, st.batches, n)) > rec.loss + 1e-3

        gen = torch.Generator().manual_seed(0)
        v = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
        scale = float(sum((x ** 2).sum() for x in v.values()).sqrt())
        v = {k: x / scale for k, x in v.items()}
        batched = {k: x[None] for k, x in v.items()}
        hv = {k: x[0] for k, x in make_hvp_backend("exact", fl).hvp(params, st.batches, n, batched).items()}
        eps = 1e-2
        gp = fl.grad({k: params[k] + eps * v[k] for k in params}, st.batches, n)
        gm = fl.grad({k: params[k] - eps * v[k] for k in params}, st.batches, n)
        assert _rel(hv, {k: (gp[k] - gm[k]) / (2 * eps) for k in params}) < 1e-3
        hv_dense = {k: x[0] for k, x in make_hvp_backend("exact", dense).hvp(params, st.batches, n, batched).items()}
        assert _rel(hv_dense, hv) > 1e-2

        # GGN: v^T G v against the output losses' second derivatives along J v (J v by finite
        # differences), along the router weights where the router term is a large part of it.
        v = {k: (x if ".gate." in k else torch.zeros_like(x)) for k, x in v.items()}
        batched = {k: x[None] for k, x in v.items()}
        ggn = make_hvp_backend("GGN", fl).hvp(params, st.batches, n, batched)
        quad = float(sum((ggn[k][0] * v[k]).sum() for k in v))
        m = sum(1 for b in st.batches if (b["sample_ids"] >= 0).any())
        h, expect = 1e-3, 0.0
        for b in st.batches:
            zp, rp = fl.forward({k: params[k] + h * v[k] for k in params}, b)
            zm, rm = fl.forward({k: params[k] - h * v[k] for k in params}, b)
            z0, r0 = fl.forward(params, b)
            jz, jr = (zp - zm) / (2 * h), [(a - c) / (2 * h) for a, c in zip(rp, rm)]
            def along(e, z0=z0, r0=r0, jz=jz, jr=jr, b=b):
                return (token_nll_sum(z0.detach() + e * jz, b["labels"])
                        + (n / m) * s.router_aux.loss([r.detach() + e * d for r, d in zip(r0, jr)], b))
            expect += float(torch.autograd.functional.hessian(along, torch.zeros(()))) / n
        assert math.isclose(quad, expect, rel_tol=2e-2), (quad, expect)
        dense_ggn = make_hvp_backend("GGN", dense).hvp(params, st.batches, n, batched)
        assert not math.isclose(float(sum((dense_ggn[k][0] * v[k]).sum() for k in v)), quad, rel_tol=0.2)


class _Rank(DataParallel):
    """One of two simulated ranks: its reduction is the identity, the test adds the ranks' outputs."""

    def sum(self, parts):
        return parts


def _engine_grad(rep, t: int, excluded: set[int], params: dict, shift: dict | None = None) -> dict:
    """The training engine's own unclipped gradient of step ``t`` at ``params + shift`` without ``excluded``."""
    rep.seek(t)
    named = rep.engine.trainable()
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(params[k] + (shift[k] if shift is not None else 0.0))
    cap = _Capture(named, grads=True)
    rec = rep.log.record(t)
    run_step(rep.engine, t, rec.epoch, rec.micro_batches, set(rec.excluded) | excluded, cap)
    rep._pos = rep._origin = None  # the engine left the recorded trajectory
    return cap.grads


def test_moe_router_term_is_data_parallel_and_in_the_remaining_rows_curvature(moe_run):
    """Two ranks' shares (each with the *step's* router weight N~/M+, the normaliser applied after
    the reduction) add up to one process for the gradient, the injection and both curvatures; and
    the curvature of the remaining rows at an injection step (``counterfactual_batches``: kept
    micro-batches, N', M+') is that of the engine's counterfactual step loss, router term included."""
    s, st, params, n = _first_injection_step(moe_run[0])
    rep, forget, t = s.replayer, set(FORGET), st.step
    names = list(st.params)
    one = FunctionalLM(s.template, names, router=s.router_aux, dp=DataParallel())
    ranks = [FunctionalLM(s.template, names, router=s.router_aux, dp=_Rank(r, 2)) for r in (0, 1)]
    assert len(st.batches) == 2 and [len(fl.dp.share(st.batches)) for fl in ranks] == [1, 1]
    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
    scale = float(sum((x ** 2).sum() for x in v.values()).sqrt())
    v = {k: x / scale for k, x in v.items()}
    batched = {k: x[None] for k, x in v.items()}
    with one.curvature_mode():
        pairs = [(one.grad(params, st.batches, n), [fl.grad(params, st.batches, n) for fl in ranks]),
                 (removal_injection(one, params, st.batches, forget, n),
                  [removal_injection(fl, params, st.batches, forget, n) for fl in ranks])]
        for mode in ("exact", "GGN"):
            pairs.append((make_hvp_backend(mode, one).hvp(params, st.batches, n, batched),
                          [make_hvp_backend(mode, fl).hvp(params, st.batches, n, batched) for fl in ranks]))
        for ref, (r0, r1) in pairs:
            for k in ref:
                torch.testing.assert_close(r0[k] + r1[k], ref[k], rtol=1e-5, atol=1e-7)

        # H^{-Z} v: the kept rows' curvature with N' and M+' against finite differences of the
        # engine's counterfactual gradient (a separate implementation of the same loss)
        kept, n_keep = sample_counterfactual_batches([forget])(st, 0)
        assert n_keep < n
        hv = {k: x[0] for k, x in make_hvp_backend("exact", one).hvp(params, kept, n_keep, batched).items()}
        eps = 1e-3  # small: a larger step along v switches some tokens' top-2 experts (measured at 1e-2)
        gp = _engine_grad(rep, t, forget, params, {k: eps * x for k, x in v.items()})
        gm = _engine_grad(rep, t, forget, params, {k: -eps * x for k, x in v.items()})
        fd = {k: (gp[k] - gm[k]) / (2 * eps) for k in params}
        assert _rel(hv, fd) < 3e-3
        dense = FunctionalLM(s.template, names, dp=DataParallel())
        hv_dense = {k: x[0] for k, x in make_hvp_backend("exact", dense).hvp(params, kept, n_keep, batched).items()}
        assert _rel(hv_dense, fd) > 1e-2  # without the router term it is another loss's curvature


@pytest.mark.slow
def test_moe_lmcleaner_with_router_losses_is_closer_to_retrain(moe_run):
    """With the router term in the injection and the curvature the correction is several times
    closer to retraining than an NLL-only one (measured 0.004-0.017 vs 0.046-0.055 over 4 forget sets,
    ``benchmarks/moe.py``)."""
    run_dir, oracle = moe_run
    torch.set_num_threads(1)
    s = UnlearnSession(run_dir)
    theta = s.replayer.state_at(s.tau)[0]

    def err(params):
        num = sum(((params[k].double() - oracle[k].double()) ** 2).sum() for k in oracle)
        return float((num / sum(((theta[k].double() - oracle[k].double()) ** 2).sum() for k in oracle)).sqrt())

    full = err(s.run("LMCleanerSampleLevel", FORGET, hessian_mode="exact").params)
    router, s.router_aux = s.router_aux, None
    nll_only = err(s.run("LMCleanerSampleLevel", FORGET, hessian_mode="exact").params)
    s.router_aux = router
    assert full < 0.05 and full < 0.5 * nll_only, (full, nll_only)
