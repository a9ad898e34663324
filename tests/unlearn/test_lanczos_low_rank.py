"""Lanczos eigenpairs and the low_rank HVP backend against explicitly formed Hessians."""

from __future__ import annotations

import pytest
import torch

from lmcleaner.unlearn import LMCleanerSampleLevel, make_hvp_backend
from lmcleaner.unlearn.hvp import BACKENDS, ExactHVP, LowRankHVP
from lmcleaner.unlearn.lanczos import flatten_batch, lanczos, top_eigenpairs

from .test_unlearn_hvp import _hessian, _problem
from .unlearn_harness import TinyMLPLM, occurrences, rel_error

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = TinyMLPLM(vocab=12, dim=4, hidden=6)  # 186 parameters
    prob = _problem(model, 12)
    fl, params, batches, N, unflat, flat, flat0, V = prob
    H = _hessian(fl, batches, N, unflat, flat0).double()
    H = (H + H.T) / 2
    evals, evecs = torch.linalg.eigh(H)
    order = evals.abs().argsort(descending=True)
    return prob, H, evals[order], evecs[:, order]


def _exact_matvec(prob):
    fl, params, batches, N, *_ = prob
    backend = ExactHVP(fl)
    return backend, (lambda V: backend.hvp(params, batches, N, V))


def _subspace_gap(A: torch.Tensor, B: torch.Tensor) -> float:
    """sin of the largest principal angle between span(A) and span(B) (orthonormal columns)."""
    return float(torch.linalg.norm(A - B @ (B.T @ A), 2))


@pytest.mark.parametrize("block", [1, 4])
def test_top_eigenpairs_match_explicit_eigendecomposition(problem, block):
    prob, H, evals, evecs = problem
    fl, params, batches, N, unflat, flat, flat0, V = prob
    r = 4
    backend, mv = _exact_matvec(prob)
    res = lanczos(mv, params, r, iters=48 // block, block=block, seed=3)
    assert res.hvps == 48 and backend.vectors == 48  # k-directions batched: 48/block calls
    assert backend.calls == 48 // block
    assert torch.allclose(res.eigvals.double(), evals[:r], rtol=1e-3, atol=1e-6)
    U = flatten_batch(res.eigvecs, list(params)).double()
    assert torch.allclose(U.T @ U, torch.eye(r, dtype=torch.float64), atol=1e-5)  # orthonormal
    # eigenvectors up to sign, checked as a subspace (robust to near-degenerate pairs)
    assert _subspace_gap(U, evecs[:, :r]) < 1e-2
    assert float(res.residuals.max()) < 1e-3 * float(evals[0].abs())
    # the public signature
    vals, vecs = top_eigenpairs(mv, params, r, iters=48 // block, block=block, seed=3)
    assert vals.shape == (r,) and all(v.shape == (r, *params[n].shape) for n, v in vecs.items())


def test_full_krylov_space_is_the_exact_eigendecomposition(problem):
    prob, H, evals, evecs = problem
    fl, params, *_ = prob
    n = H.shape[0]
    _, mv = _exact_matvec(prob)
    res = lanczos(mv, params, n, seed=1)  # default iters: capped at n
    assert res.dim == n
    U = flatten_batch(res.eigvecs, list(params)).double()
    recon = U @ torch.diag(res.eigvals.double()) @ U.T
    assert float((recon - H).norm() / H.norm()) < 1e-4
    assert torch.allclose(res.eigvals.double(), evals, atol=1e-4 * float(evals[0].abs()))


def test_breakdown_on_a_low_rank_operator_continues_with_fresh_directions():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(30, 3, generator=g))[0]
    A = U @ torch.diag(torch.tensor([5.0, -3.0, 1.0])) @ U.T
    tmpl = {"w": torch.zeros(5, 6)}

    def mv(V):
        return {"w": (V["w"].reshape(V["w"].shape[0], -1) @ A).reshape(V["w"].shape)}

    for block in (1, 4):
        res = lanczos(mv, tmpl, 3, iters=12 // block, block=block)
        assert torch.allclose(res.eigvals, torch.tensor([5.0, -3.0, 1.0]), atol=1e-4)
    with pytest.raises(ValueError, match="rank r=0"):
        lanczos(mv, tmpl, 0)
    with pytest.raises(ValueError, match="which"):
        lanczos(mv, tmpl, 2, which="SM")


def test_low_rank_backend_is_registered_and_exact_at_full_rank(problem):
    prob, H, evals, evecs = problem
    fl, params, batches, N, unflat, flat, flat0, V = prob
    assert BACKENDS["low_rank"] is LowRankHVP
    n = H.shape[0]
    backend = make_hvp_backend("low_rank", fl, rank=n, refresh=1, block=8)
    out = backend.hvp(params, batches, N, unflat(V))
    assert backend.last_path == "low_rank"
    ref = V.double() @ H
    assert float((flat(out).double() - ref).norm() / ref.norm()) < 1e-4


def test_low_rank_error_decreases_with_rank_and_equals_the_truncation(problem):
    prob, H, evals, evecs = problem
    fl, params, batches, N, unflat, flat, flat0, V = prob
    ref = V.double() @ H
    errs, expected = [], []
    for r in (2, 8, 32, 96):
        backend = make_hvp_backend("low_rank", fl, rank=r, refresh=1, iters=(2 * r + 40) // 4, block=4)
        out = flat(backend.hvp(params, batches, N, unflat(V))).double()
        errs.append(float((out - ref).norm() / ref.norm()))
        Ur = evecs[:, :r]
        expected.append(float((V.double() @ (Ur @ torch.diag(evals[:r]) @ Ur.T) - ref).norm() / ref.norm()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # the error is the best rank-r approximation's, up to Lanczos accuracy
    assert all(abs(e - x) < 0.05 * max(x, 1e-3) + 1e-3 for e, x in zip(errs, expected)), (errs, expected)


def test_low_rank_refresh_schedule_and_amortised_cost(problem):
    prob, H, evals, evecs = problem
    fl, params, batches, N, unflat, flat, flat0, V = prob
    backend = make_hvp_backend("low_rank", fl, rank=4, refresh=3, iters=3, block=4)
    assert backend.cost_in_grads == 0.0
    for step in range(7):  # refreshes at steps 0, 3, 6
        backend.hvp(params, batches, N, unflat(V), step=step)
    assert backend.refreshes == 3
    assert backend.lanczos_hvps == 3 * 12  # 3 iterations x block 4, per refresh
    assert backend.vectors == 7 * V.shape[0]
    exact_cost = ExactHVP(fl).cost_in_grads
    assert backend.cost_in_grads == pytest.approx(36 * exact_cost / (7 * V.shape[0]))
    info = backend.describe()
    assert info["refreshes"] == 3 and info["lanczos_hvps"] == 36 and info["krylov_dim"] == 12
    with pytest.raises(ValueError, match="refresh"):
        make_hvp_backend("low_rank", fl, refresh=0)


def test_lmcleaner_with_low_rank_curvature(mlp_sgd):
    """Through the method: the options reach the backend, the audit counts the Lanczos HVPs
    and charges them (the products themselves are free), and the correction helps."""
    z = mlp_sgd.schedule[1][0][0]
    occ = occurrences(mlp_sgd.steps, z)
    steps = mlp_sgd.steps[occ[0]:]
    low = LMCleanerSampleLevel(K=8, hessian_mode="low_rank", hvp_options={"rank": 8, "refresh": 4}).compute(
        mlp_sgd.model, steps, mlp_sgd.spec, [z], mlp_sgd.tau)
    stats = low.audit.hvp_stats
    assert stats["rank"] == 8 and stats["refresh"] == 4 and stats["lanczos_hvps"] == 28 * stats["refreshes"]
    assert stats["refreshes"] >= len(occ)  # every injection window needs at least one basis
    assert low.audit.grad_equivalents == pytest.approx(low.audit.n_grad_evals + stats["lanczos_hvps"] * 2.0)
    re = mlp_sgd.retrain(frozenset({z}))
    assert rel_error(mlp_sgd.run.final, low.delta_params, re.final) < 1.0  # better than doing nothing
