"""Certified removal: the Gaussian mechanism, the residual bounds, the noise, and an
empirical distinguishability audit, on tiny models small enough to check exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_dist

from lmcleaner.trajectory.types import OptimizerSpec, ParamGroupSpec, StepRecord
from lmcleaner.unlearn import LMCleanerSampleLevel, Rollback
from lmcleaner.unlearn.certify import (
    CertifyConfig,
    GaussianNoise,
    NoFormalBound,
    adam_state_bound,
    adam_update_bound,
    analytic_sigma,
    certify_config,
    classic_sigma,
    formal_residual_bound,
    gaussian_delta,
    gaussian_sigma,
    hessian_basis,
    subspace_sigmas,
)
from lmcleaner.unlearn.certify.mechanism import flatten
from lmcleaner.unlearn.result import UnlearnError

from .test_unlearn_hvp import _hessian, _problem
from .unlearn_harness import OptCfg, TinyMLPLM, occurrences

pytestmark = pytest.mark.usefixtures("single_thread")


# -- the Gaussian mechanism -----------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.1, 0.5, 0.99, 1.0, 2.0, 8.0, 40.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
def test_analytic_sigma_is_the_smallest_root_of_its_defining_equation(eps, delta):
    s = analytic_sigma(eps, delta)
    assert gaussian_delta(s, eps) <= delta
    assert gaussian_delta(s, eps) == pytest.approx(delta, rel=1e-6)
    assert gaussian_delta(s * (1 - 1e-4), eps) > delta  # minimal
    assert analytic_sigma(eps, delta, 2.5) == pytest.approx(2.5 * s, rel=1e-9)  # proportional to the sensitivity
    assert analytic_sigma(eps, delta, 0.0) == 0.0


def test_analytic_against_the_classic_formula_where_both_apply():
    assert analytic_sigma(1.0, 1e-5) == pytest.approx(3.7306, abs=1e-3)  # reference value (Balle & Wang 2018)
    for eps in (0.05, 0.2, 0.5, 0.9):
        for delta in (1e-3, 1e-6, 1e-10):
            classic, analytic = classic_sigma(eps, delta), analytic_sigma(eps, delta)
            assert classic == pytest.approx(math.sqrt(2 * math.log(1.25 / delta)) / eps)
            assert gaussian_delta(classic, eps) <= delta  # the classic sigma is sufficient ...
            assert 0.3 < analytic / classic <= 1.0  # ... and never smaller than the exact one
    with pytest.raises(ValueError, match="epsilon < 1"):
        classic_sigma(1.5, 1e-5)
    assert gaussian_sigma(0.5, 1e-5, 1.0, "classic") == classic_sigma(0.5, 1e-5)
    for bad in ({"epsilon": 0.0}, {"epsilon": float("inf")}, {"delta": 0.0}, {"delta": 1.0},
                {"calibration": "classic", "epsilon": 2.0}, {"bound": "proven"}, {"subspace_rank": -1}):
        with pytest.raises(UnlearnError, match="certify"):
            certify_config(bad)


def test_subspace_sigmas_keep_the_whitened_sensitivity_and_minimise_the_noise():
    eps, delta, b_par, b_perp, r, n = 1.0, 1e-5, 0.9, 0.2, 10, 5000
    s1 = analytic_sigma(eps, delta)
    sp, sq, alpha = subspace_sigmas(eps, delta, b_par, b_perp, r, n)
    assert (b_par / sp) ** 2 + (b_perp / sq) ** 2 == pytest.approx(1 / s1 ** 2)
    energy = r * sp ** 2 + (n - r) * sq ** 2
    for a in (alpha * 0.8, min(alpha * 1.2, 0.999)):  # any other split of the budget is noisier
        assert r * (s1 * b_par) ** 2 / a + (n - r) * (s1 * b_perp) ** 2 / (1 - a) > energy
    assert sq < s1 * math.hypot(b_par, b_perp)  # smaller than the isotropic sigma outside the subspace
    assert subspace_sigmas(eps, delta, 1.0, 0.0, r, n)[:2] == (pytest.approx(s1), 0.0)


# -- the formal bound --------------------------------------------------------------------
def _records(lrs: list[float], groups: int = 1) -> list[StepRecord]:
    return [StepRecord(step=t, epoch=0, micro_batches=[[0]], lrs=[lr] * groups, normaliser=1, loss=0.0,
                       grad_norm=1.0, clipped=False, rng_seed=0) for t, lr in enumerate(lrs)]


def _spec(name: str = "sgd", clip: float | None = 1.0, momentum: float = 0.0, wd: float = 0.0) -> OptimizerSpec:
    return OptimizerSpec(name=name, groups=[ParamGroupSpec(["w"], wd, 0.1)], momentum=momentum, max_grad_norm=clip)


def test_formal_bound_closed_forms():
    lrs = [0.1 * (1 - t / 40) for t in range(20)]
    recs, tau, c = _records(lrs), 20, 1.0
    worst = formal_residual_bound(_spec(), recs, [3, 9], tau, 100)
    assert worst.guarantee == "formal" and worst.assumptions == []
    assert worst.value == pytest.approx(2 * c * sum(lrs[4:]))  # every step after the first use, exact first step
    lip = formal_residual_bound(_spec(), recs, [3, 9], tau, 100, assume="lipschitz", rho=1.0)
    assert lip.value == pytest.approx(2 * 2 * c * (lrs[3] + lrs[9]))  # retraining + correction, 2c per use
    assert "Lipschitz" in lip.assumptions[0] and "not proven" in lip.assumptions[0]
    batch = formal_residual_bound(_spec(), recs, [3, 9], tau, 100, level="batch", assume="lipschitz")
    # counterfactual gradient 0: c per use for retraining and for the correction's first use; a later use
    # lands on a column already carrying a deviation: 2c
    assert batch.value == pytest.approx(c * (lrs[3] + lrs[9]) + c * lrs[3] + 2 * c * lrs[9])
    # contraction: the carried part of a truncated correction decays with the window K
    by_k = [formal_residual_bound(_spec(), recs, [3], tau, 100, assume="lipschitz", rho=0.8, K=k).value
            for k in (1, 4, 16)]
    assert by_k[0] > by_k[1] > by_k[2]
    assert by_k[2] == pytest.approx(2 * c * lrs[3] * (0.8 ** 16 + 0.8 ** 16))
    # truncated windows that overlap are separate columns, each with its own clipped change
    overlap = formal_residual_bound(_spec(), recs, [3, 4], tau, 100, K=2)
    assert overlap.value == pytest.approx(2 * c * (sum(lrs[4:]) + lrs[4] + lrs[5]))  # 2 columns at steps 4, 5
    # momentum amplifies, weight decay contracts, AdamW pays sqrt(n)
    assert formal_residual_bound(_spec(momentum=0.9), recs, [3], tau, 100).value > worst.value
    assert formal_residual_bound(_spec(wd=0.5), recs, [3, 9], tau, 100).value < worst.value
    adam = formal_residual_bound(_spec("adamw", clip=None), recs, [3], tau, 10_000)
    assert adam.value == pytest.approx(sum(lr * 2 * adam_state_bound(0.9, 0.999, t + 1) * 100
                                           for t, lr in enumerate(lrs) if t >= 3))  # first step included
    # a result that equals retraining up to a later step (the exact first window of propagation=replay)
    windowed = formal_residual_bound(_spec(), recs, [3, 9], tau, 100, exact_until=12)
    assert windowed.value == pytest.approx(2 * c * sum(lrs[12:]))


def test_no_formal_bound_without_clipping_or_for_unsupported_assumptions():
    recs = _records([0.1] * 10)
    with pytest.raises(NoFormalBound, match="not clipped"):
        formal_residual_bound(_spec(clip=None), recs, [2], 10, 100)
    with pytest.raises(NoFormalBound, match="plain SGD"):
        formal_residual_bound(_spec(momentum=0.9), recs, [2], 10, 100, assume="lipschitz")
    with pytest.raises(NoFormalBound, match="records"):
        formal_residual_bound(_spec(), recs[:5], [2], 10, 100)


def test_adam_update_bound_holds_for_torch_adamw():
    """|update / lr| <= C_t per coordinate for adversarial-looking gradients (sparse spikes, sign flips);
    the state bound used for corrected (clamped) states is never smaller."""
    assert adam_update_bound(0.9, 0.999, 1) == 1.0
    assert all(adam_state_bound(0.9, 0.999, t) >= adam_update_bound(0.9, 0.999, t) for t in (1, 10, 1000))
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(2000))
    opt = torch.optim.AdamW([p], lr=1.0, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0)
    worst = 0.0
    for t in range(1, 200):
        grad = torch.randn(2000, generator=g) * (torch.rand(2000, generator=g) < 0.05) * 10 ** (3 * torch.rand(1).item())
        grad[:100] = (-1.0) ** t * (1e-6 if t > 5 else 1.0)  # large early gradient, then tiny: the worst ratio
        before = p.detach().clone()
        p.grad = grad
        opt.step()
        ratio = float((p.detach() - before).abs().max())
        worst = max(worst, ratio / adam_update_bound(0.9, 0.999, t))
    assert worst <= 1.0 + 1e-5
    assert worst > 0.5  # the bound is not vacuous


CLIPPED_SGD = OptCfg(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01, max_grad_norm=0.3)
CLIPPED_PLAIN = OptCfg(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.01, max_grad_norm=0.3)


@pytest.fixture(scope="module")
def clipped_sgd():
    from .conftest import Setup

    return Setup(lambda: TinyMLPLM(), 48, 3, CLIPPED_SGD)


def _residual(setup, corr, forget):
    re = setup.retrain(frozenset(forget))
    return math.sqrt(sum(float(((setup.run.final[n] + corr.delta_params[n] - re.final[n]) ** 2).sum())
                         for n in re.final))


def test_formal_worst_case_bound_holds_against_exact_retraining(clipped_sgd, mlp_adamw):
    """The proven bound must hold: residual of the correction (full and truncated window,
    rollback) <= B, for clipped SGD with momentum + weight decay and for clipped AdamW."""
    for setup in (clipped_sgd, mlp_adamw):
        z = setup.schedule[1][0][0]
        occ = occurrences(setup.steps, z)
        n = sum(p.numel() for p in setup.run.final.values())
        recs = [s.record for s in setup.steps]
        for method in (LMCleanerSampleLevel(K=800), LMCleanerSampleLevel(K=3), Rollback()):
            corr = method.compute(setup.model, setup.steps[occ[0]:], setup.spec, [z], setup.tau)
            bound = formal_residual_bound(setup.spec, recs, occ, setup.tau, n, K=method.K,
                                          damping=getattr(method, "damping", 0.0))
            residual = _residual(setup, corr, [z])
            assert 0 < residual <= bound.value, (setup.spec.name, method.K, residual, bound.value)


def test_the_correction_is_exact_on_its_first_step(clipped_sgd, mlp_adamw):
    """The proof's first step: with the exact optimizer map the correction reproduces the
    counterfactual step (clipped SGD with momentum), so the residual starts at 0. With AdamW it
    does too except where rounding meets a zero second moment (coordinates only the forgotten
    sample ever touched: g + e is ~1e-10, not 0, and m/(sqrt(v)+eps) amplifies it), which is why
    the AdamW bound counts the first step."""
    for setup in (clipped_sgd, mlp_adamw):
        z = setup.schedule[1][0][0]
        t = occurrences(setup.steps, z)[0]
        corr = LMCleanerSampleLevel(K=800, damping=0.0).compute(setup.model, setup.steps[t:t + 1], setup.spec,
                                                               [z], t + 1)
        pre, re = setup.prefix(t + 1), setup.retrain(frozenset({z}), frozenset(), t + 1)
        state = setup.steps[t].opt_state or {}
        err = move = 0.0
        for n in re.final:
            d = pre.final[n] + corr.delta_params[n] - re.final[n]
            if setup.spec.name == "adamw":
                d = d * (state[n]["exp_avg_sq"] > 0)  # rounding amplified only where v == 0
            err += float((d ** 2).sum())
            move += float(((pre.final[n] - re.final[n]) ** 2).sum())
        assert math.sqrt(err) < 1e-3 * math.sqrt(move), setup.spec.name  # float32 rounding of theta


# -- the noise ----------------------------------------------------------------------------
def test_noise_is_reproducible_from_its_seed():
    template = {"b": torch.zeros(3, 4), "a": torch.zeros(7, dtype=torch.float64)}
    noise = GaussianNoise(0.3, seed=1234)
    one, two = noise.sample(template), GaussianNoise(0.3, seed=1234).sample(template)
    assert all(torch.equal(one[k], two[k]) for k in template)
    noised = noise.add_to({k: v + 1 for k, v in template.items()})
    assert noised["a"].dtype == torch.float64 and torch.allclose(noised["a"], 1 + one["a"].double())
    other = GaussianNoise(0.3, seed=1235).sample(template)
    assert not torch.equal(one["b"], other["b"])
    flat = flatten(one)
    assert flat.numel() == 19 and 0.05 < float(flat.std()) < 0.6


def test_subspace_noise_lies_in_the_top_curvature_subspace():
    """Against an explicit eigendecomposition (torch.autograd.functional.hessian)."""
    torch.manual_seed(0)
    model = TinyMLPLM(vocab=12, dim=4, hidden=6)  # 186 parameters
    fl, params, batches, N, unflat, flat, flat0, V = _problem(model, 12)
    H = _hessian(fl, batches, N, unflat, flat0).double()
    evals, evecs = torch.linalg.eigh((H + H.T) / 2)
    top = evecs[:, evals.abs().argsort(descending=True)[:5]]
    names = list(params)
    order = sorted(range(len(names)), key=lambda i: names[i])  # GaussianNoise's sorted-name layout
    sizes = [params[n].numel() for n in names]
    starts = np.cumsum([0] + sizes)
    perm = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order])
    top = top[perm]
    vals, U = hessian_basis(fl, params, batches, N, 5, seed=0, iters=20)
    assert torch.allclose(vals.double().abs().sort(descending=True).values,
                          evals.abs().sort(descending=True).values[:5], rtol=1e-3)
    draws = GaussianNoise(0.7, 0.0, U, seed=3).draw_flat(U.shape[0], k=400).double()
    outside = draws - (draws @ top) @ top.T
    assert float(outside.norm() / draws.norm()) < 1e-2  # confined to the explicit top-5 eigenspace
    per_dir = (draws @ top).var(0)
    assert torch.allclose(per_dir, torch.full((5,), 0.49, dtype=torch.float64), rtol=0.25)
    mixed = GaussianNoise(0.7, 0.05, U, seed=3).draw_flat(U.shape[0], k=400).double()
    rest = mixed - (mixed @ top) @ top.T
    assert float((rest ** 2).sum(1).mean() / (U.shape[0] - 5)) == pytest.approx(0.05 ** 2, rel=0.1)


# -- empirical distinguishability ---------------------------------------------------------
def _epsilon_lower_bound(t1: np.ndarray, t0: np.ndarray, delta: float, conf: float = 0.99) -> float:
    """Largest epsilon the samples prove (Clopper-Pearson): over threshold sets {T > t} and {T < t},
    log((P1_low - delta) / P0_high). A mechanism satisfying (eps, delta) gives <= eps with prob >= conf."""
    m1, m0 = len(t1), len(t0)
    best = -math.inf
    a = (1 - conf) / 2
    for s1, s0 in ((t1, t0), (-t1, -t0)):
        grid = np.quantile(np.concatenate([s1, s0]), np.linspace(0.5, 0.99995, 400))
        k1 = (s1[None, :] > grid[:, None]).sum(1)
        k0 = (s0[None, :] > grid[:, None]).sum(1)
        p1_lo = np.where(k1 > 0, beta_dist.ppf(a, k1, m1 - k1 + 1), 0.0)
        p0_hi = np.where(k0 < m0, beta_dist.ppf(1 - a, k0 + 1, m0 - k0), 1.0)
        ok = p1_lo - delta > 0
        if ok.any():
            best = max(best, float(np.log((p1_lo[ok] - delta) / p0_hi[ok]).max()))
    return best


def _audit(hat: torch.Tensor, oracle: torch.Tensor, noise: GaussianNoise, whiten, draws: int = 24_000,
           seed: int = 7) -> float:
    """Optimal (likelihood-ratio) scalar statistic over noise draws of hat + N and oracle + N."""
    g = torch.Generator().manual_seed(seed)
    n = hat.numel()
    direction = whiten(hat - oracle)
    stats = []
    for centre in (hat, oracle):
        parts = [((centre + noise.draw_flat(n, 4000, g)) @ direction).numpy() for _ in range(draws // 4000)]
        stats.append(np.concatenate(parts))
    return _epsilon_lower_bound(stats[0], stats[1], noise.meta.get("delta", 1e-5))


def test_empirical_privacy_loss_does_not_exceed_epsilon(mlp_sgd):
    """Certified result vs oracle + the same noise on a tiny model: the privacy loss the samples
    prove stays <= epsilon at delta (isotropic and subspace noise), and the audit has power:
    a third of the calibrated noise is caught."""
    z = mlp_sgd.schedule[1][0][0]
    occ = occurrences(mlp_sgd.steps, z)
    corr = LMCleanerSampleLevel(K=5).compute(mlp_sgd.model, mlp_sgd.steps[occ[0]:], mlp_sgd.spec, [z],
                                             mlp_sgd.tau)
    re = mlp_sgd.retrain(frozenset({z}))
    hat = flatten({n: mlp_sgd.run.final[n] + corr.delta_params[n] for n in re.final})
    oracle = flatten(re.final)
    r = hat - oracle
    bound = float(r.norm())  # the sharpest valid sensitivity: the shift is exactly B
    eps, delta = 1.0, 1e-3
    sigma = analytic_sigma(eps, delta, bound)
    iso = GaussianNoise(sigma, seed=0, meta={"delta": delta})
    assert _audit(hat, oracle, iso, lambda v: v) <= eps
    weak = GaussianNoise(sigma / 3, seed=0, meta={"delta": delta})
    assert _audit(hat, oracle, weak, lambda v: v) > eps
    # subspace noise: random orthonormal 8-dim subspace, residual split measured
    U = torch.linalg.qr(torch.randn(hat.numel(), 8, generator=torch.Generator().manual_seed(1)))[0]
    U[:, 0] = r / r.norm()  # make the residual mostly in-subspace, as the paper expects
    U = torch.linalg.qr(U)[0]
    b_par = float((U.T @ r).norm())
    b_perp = math.sqrt(max(bound ** 2 - b_par ** 2, 0.0)) + 1e-3 * bound
    s_par, s_perp, _ = subspace_sigmas(eps, delta, b_par, b_perp, 8, hat.numel())
    sub = GaussianNoise(s_par, s_perp, U, seed=0, meta={"delta": delta})

    def whiten(v):  # Sigma^{-1} v
        par = U @ (U.T @ v)
        return par / s_par ** 2 + (v - par) / s_perp ** 2

    assert _audit(hat, oracle, sub, whiten) <= eps
    assert s_perp < sigma / 5  # far less noise outside the subspace than isotropic noise needs


def test_certify_config_from_overrides_is_typed():
    cfg = certify_config({"epsilon": "2", "delta": 1e-6, "subspace_rank": 4})
    assert isinstance(cfg, CertifyConfig) and cfg.epsilon == 2.0 and cfg.subspace_rank == 4
    with pytest.raises(UnlearnError, match="certify"):
        certify_config({"epsilon": 1, "sigma": 3})
    assert json.loads(json.dumps(cfg.__dict__))["bound"] == "formal"
