"""One sweep for many requests, apply_correction, precision, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from lmcleaner.unlearn import (
    ExactHVP,
    FunctionalLM,
    LMCleanerBatchLevel,
    LMCleanerSampleLevel,
    Rollback,
    apply_correction,
    propagate,
    sample_injector,
)
from .unlearn_harness import Counting, occurrences, rel_error

FULL = 800
pytestmark = pytest.mark.usefixtures("single_thread")


def _disjoint_pair(setup):
    """Two samples that never share a step (so the joint injection is the sum)."""
    first = setup.schedule[1][0][0]
    occ1 = set(occurrences(setup.steps, first))
    for z in range(len(setup.data)):
        occ2 = set(occurrences(setup.steps, z))
        if z != first and not occ1 & occ2 and min(occ2) > min(occ1):
            return first, z, sorted(occ1 | occ2)
    raise AssertionError("no disjoint pair")


@pytest.mark.parametrize("K", [FULL, 5])
def test_many_samples_one_sweep_equals_sum_of_separate_sweeps(mlp_sgd, K):
    z1, z2, occ = _disjoint_pair(mlp_sgd)
    steps = mlp_sgd.steps[occ[0]:]
    m = LMCleanerSampleLevel(K=K, hessian_mode="exact")
    counting = Counting(steps)
    joint = m.compute(mlp_sgd.model, counting, mlp_sgd.spec, [z1, z2], mlp_sgd.tau)
    a = m.compute(mlp_sgd.model, steps, mlp_sgd.spec, [z1], mlp_sgd.tau)
    b = m.compute(mlp_sgd.model, steps, mlp_sgd.spec, [z2], mlp_sgd.tau)
    # Superposition holds to first order: the joint sweep differs from the sum only where one
    # request's deviation meets the other's removed rows (curvature H^{-Z} of the remaining rows).
    summed = {n: a.delta_params[n] + b.delta_params[n] for n in joint.delta_params}
    assert rel_error({n: torch.zeros_like(v) for n, v in summed.items()}, joint.delta_params, summed) < 0.05
    # one sweep: every step yielded once, one batched HVP call per step at most
    assert counting.iterations == 1 and counting.yielded == [s.step for s in steps]
    au = joint.audit
    assert au.sweeps == 1 and au.steps_touched == occ
    assert au.n_hvp_calls <= len(steps)
    if K == FULL:  # one vector carries every injection
        assert au.n_hvp_vectors == au.n_hvp_calls
    else:  # truncation: separate vectors, batched in the same call
        assert au.n_hvp_vectors > au.n_hvp_calls
        assert au.hvp_path == "vmap"
    re = mlp_sgd.retrain(frozenset({z1, z2}))
    assert rel_error(mlp_sgd.run.final, joint.delta_params, re.final) < (0.15 if K == FULL else 0.9)
    assert rel_error(mlp_sgd.run.final, joint.delta_params, re.final) <= rel_error(mlp_sgd.run.final, summed,
                                                                                   re.final) + 1e-3


def test_requests_share_a_sweep_and_linear_map_is_linear(mlp_adamw):
    """propagate() with several requests: each equals its own sweep (AdamW, DESIGN's linear map)."""
    z1, z2, occ = _disjoint_pair(mlp_adamw)
    steps = mlp_adamw.steps[occ[0]:]
    fl = FunctionalLM(mlp_adamw.model, steps[0].params.keys())
    kw = dict(tau=mlp_adamw.tau, K=FULL, fl=fl, damping=1e-4, optimizer_map="linear")
    hvp = ExactHVP(fl)
    with fl.curvature_mode():
        res = propagate(steps, mlp_adamw.spec, sample_injector(fl, [{z1}, {z2}, {z1, z2}]), hvp=hvp,
                        n_requests=3, **kw)
        one = propagate(steps, mlp_adamw.spec, sample_injector(fl, [{z1}]), hvp=ExactHVP(fl), **kw)
    assert res.stats.sweeps == 1 and res.stats.columns == 3
    assert res.stats.hvp_calls <= len(steps)  # the three requests' HVPs are one batched call per step
    d0, d1, d2 = res.delta_params
    for n in d0:
        assert torch.allclose(d0[n], one.delta_params[0][n], rtol=1e-5, atol=1e-8)
        assert torch.allclose(d2[n], d0[n] + d1[n], rtol=1e-4, atol=1e-7)
        assert torch.allclose(res.delta_opt_state[2][n]["exp_avg_sq"],
                              res.delta_opt_state[0][n]["exp_avg_sq"] + res.delta_opt_state[1][n]["exp_avg_sq"],
                              rtol=1e-4, atol=1e-9)


def test_apply_correction_returns_new_tensors_that_differ(mlp_adamw):
    """The original trainer returned the pre-unlearning model bit for bit: impossible here."""
    z = mlp_adamw.schedule[1][0][0]
    occ = occurrences(mlp_adamw.steps, z)
    corr = LMCleanerSampleLevel(K=FULL, hessian_mode="GGN").compute(
        mlp_adamw.model, mlp_adamw.steps[occ[0]:], mlp_adamw.spec, [z], mlp_adamw.tau)
    model = copy.deepcopy(mlp_adamw.model)
    model.load_state_dict(mlp_adamw.run.final)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = mlp_adamw.run.final_opt_state
    state_before = copy.deepcopy(state)
    new, new_state = apply_correction(model, state, corr)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])  # input untouched
        assert new[n].data_ptr() != p.data_ptr()
        assert torch.allclose(new[n], p + corr.delta_params[n])
    assert any(not torch.equal(new[n], before[n]) for n in new)
    for n in state:
        assert torch.equal(state[n]["exp_avg"], state_before[n]["exp_avg"])
        assert not torch.equal(new_state[n]["exp_avg"], state[n]["exp_avg"])
        assert (new_state[n]["exp_avg_sq"] >= 0).all()
        assert torch.equal(new_state[n]["step"], state[n]["step"])
    assert corr.audit.correction_norm > 0 and corr.audit.grad_equivalents > 0
    assert set(corr.audit.to_json()) >= {"steps_touched", "injection_norms", "correction_norm", "n_hvp_vectors",
                                          "grad_equivalents", "seconds"}


def test_a_correction_that_vanishes_in_bf16_is_an_error(mlp_sgd):
    z = mlp_sgd.schedule[1][0][0]
    occ = occurrences(mlp_sgd.steps, z)
    corr = Rollback().compute(mlp_sgd.model, mlp_sgd.steps[occ[0]:], mlp_sgd.spec, [z], mlp_sgd.tau)
    params16 = {n: t.abs().bfloat16() + 1.0 for n, t in mlp_sgd.run.final.items()}  # >= 1: bf16 step >= 2^-7
    tiny = copy.copy(corr)
    tiny.delta_params = {n: d * 1e-4 / max(corr.audit.correction_norm, 1e-12) for n, d in corr.delta_params.items()}
    with pytest.raises(RuntimeError, match="vanished"):
        apply_correction(params16, None, tiny)
    new, _ = apply_correction({n: t.float() for n, t in params16.items()}, None, tiny)  # float32 master: fine
    assert any(not torch.equal(new[n], params16[n].float()) for n in new)


def test_bf16_trajectory_is_propagated_in_float32(mlp_sgd):
    """Recorded bf16 parameters and a bf16 model: the sweep runs in float32 and equals the
    float32 sweep on the same (upcast) values (in bf16, eta*Hv vanishes against the weights)."""
    z = mlp_sgd.schedule[1][0][0]
    occ = occurrences(mlp_sgd.steps, z)
    steps16, steps32 = [], []
    for s in mlp_sgd.steps[occ[0]:]:
        p16 = {n: t.bfloat16() for n, t in s.params.items()}
        steps16.append(copy.copy(s))
        steps16[-1].params = p16
        steps32.append(copy.copy(s))
        steps32[-1].params = {n: t.float() for n, t in p16.items()}
    model16 = copy.deepcopy(mlp_sgd.model).bfloat16()
    m = LMCleanerSampleLevel(K=FULL, hessian_mode="exact")
    c16 = m.compute(model16, steps16, mlp_sgd.spec, [z], mlp_sgd.tau)
    c32 = m.compute(mlp_sgd.model, steps32, mlp_sgd.spec, [z], mlp_sgd.tau)
    for n in c16.delta_params:
        assert c16.delta_params[n].dtype == torch.float32
        assert torch.allclose(c16.delta_params[n], c32.delta_params[n], rtol=1e-5, atol=1e-8)


def test_diag_mode_uses_the_per_step_diagonal(mlp_sgd):
    z = mlp_sgd.schedule[1][0][0]
    occ = occurrences(mlp_sgd.steps, z)
    asked = []

    def provider(step):
        asked.append(step)
        return {n: torch.zeros_like(p) for n, p in mlp_sgd.steps[step].params.items()}

    steps = mlp_sgd.steps[occ[0]:]
    diag = LMCleanerSampleLevel(K=FULL, hessian_mode="diag", damping=0.0).compute(
        mlp_sgd.model, steps, mlp_sgd.spec, [z], mlp_sgd.tau, diag_provider=provider)
    assert asked == list(range(occ[0] + 1, mlp_sgd.tau))  # every propagated step, at its own index
    # zero curvature: exactly the optimizer-only propagation of the injections
    fl = FunctionalLM(mlp_sgd.model, steps[0].params.keys())
    with fl.curvature_mode():
        ref = propagate(steps, mlp_sgd.spec, sample_injector(fl, [{z}]), tau=mlp_sgd.tau, K=FULL, fl=fl,
                        hvp=_ZeroHVP())
    for n in diag.delta_params:
        assert torch.allclose(diag.delta_params[n], ref.delta_params[0][n], atol=1e-8)


class _ZeroHVP(ExactHVP):
    def __init__(self):
        super().__init__(None)

    def _hvp(self, params, batches, normaliser, vectors, step):
        return {n: torch.zeros_like(v) for n, v in vectors.items()}


@pytest.mark.parametrize("kwargs,match", [
    (dict(K=0), "K must be an integer >= 1"),
    (dict(K=-3), "K must be an integer >= 1"),
    (dict(K=2.5), "K must be an integer >= 1"),
    (dict(hessian_mode="hessian"), "unknown hessian_mode"),
    (dict(hessian_mode="low_rank"), "unknown hessian_mode"),
    (dict(damping=-1.0), "damping must be >= 0"),
    (dict(optimizer_map="tangent"), "unknown optimizer_map"),
])
def test_bad_arguments_are_one_line_value_errors(kwargs, match):
    for cls in (LMCleanerSampleLevel, LMCleanerBatchLevel):
        with pytest.raises(ValueError, match=match) as err:
            cls(**kwargs)
        assert "\n" not in str(err.value)


def test_bad_inputs_to_compute(mlp_sgd):
    z = mlp_sgd.schedule[1][0][0]
    steps = mlp_sgd.steps
    m = LMCleanerSampleLevel(K=FULL, hessian_mode="diag")
    with pytest.raises(ValueError, match="needs diag_provider"):
        m.compute(mlp_sgd.model, steps[1:], mlp_sgd.spec, [z], mlp_sgd.tau)
    m = LMCleanerSampleLevel(K=FULL, hessian_mode="exact")
    with pytest.raises(ValueError, match="tau-1"):
        m.compute(mlp_sgd.model, steps[1:10], mlp_sgd.spec, [z], mlp_sgd.tau)
    with pytest.raises(ValueError, match="consecutive"):
        m.compute(mlp_sgd.model, steps[1:3] + steps[4:], mlp_sgd.spec, [z], mlp_sgd.tau)
    with pytest.raises(ValueError, match="forget_ids is empty"):
        m.compute(mlp_sgd.model, steps[1:], mlp_sgd.spec, [], mlp_sgd.tau)
    bad = copy.deepcopy(mlp_sgd.spec)
    bad.groups[0].names = bad.groups[0].names[1:]
    with pytest.raises(ValueError, match="in no OptimizerSpec param group"):
        m.compute(mlp_sgd.model, steps[1:], bad, [z], mlp_sgd.tau)
    stateless = [copy.copy(st) for st in steps[1:]]
    for st in stateless:
        st.opt_state = None
    with pytest.raises(ValueError, match="no optimizer state"):
        m.compute(mlp_sgd.model, stateless, mlp_sgd.spec, [z], mlp_sgd.tau)
    bad = copy.deepcopy(mlp_sgd.spec)
    bad.name = "adagrad"
    with pytest.raises(ValueError, match="not supported"):
        m.compute(mlp_sgd.model, steps[1:], bad, [z], mlp_sgd.tau)
