"""HVP backends against explicitly formed Hessians / Gauss-Newton matrices."""

from __future__ import annotations

import logging

import pytest
import torch

import lmcleaner.unlearn.hvp.base as hvp_mod
from lmcleaner.train.loss import IGNORE_INDEX, count_supervised, shift_labels
from lmcleaner.unlearn import DiagHVP, ExactHVP, FunctionalLM, GGNHVP, make_hvp_backend
from lmcleaner.unlearn.functional import to_compute
from .unlearn_harness import TinyMLPLM, collate, make_dataset, tiny_llama

K_DIRS = 3
pytestmark = pytest.mark.usefixtures("single_thread")


def _problem(model, vocab: int, seed: int = 0):
    data = make_dataset(8, vocab=vocab, seed=seed)
    batches = [collate(data, [0, 1]), collate(data, [2, 3, 4])]  # two micro-batches, one normaliser
    N = sum(count_supervised(b["labels"]) for b in batches)
    fl = FunctionalLM(model, [n for n, _ in model.named_parameters()])
    params = to_compute(dict(model.named_parameters()))
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def unflat(flat):
        lead = flat.shape[:-1]  # optional leading direction dim
        return {n: t.reshape(*lead, *s) for n, t, s in zip(names, flat.split(sizes, -1), shapes)}

    def flat(p):
        return torch.cat([p[n].reshape(*p[n].shape[: p[n].dim() - len(s)], -1) for n, s in zip(names, shapes)], -1)

    flat0 = flat(params)
    g = torch.Generator().manual_seed(seed + 1)
    V = torch.randn(K_DIRS, flat0.numel(), generator=g)
    return fl, params, batches, N, unflat, flat, flat0, V


def _hessian(fl, batches, N, unflat, flat0):
    return torch.autograd.functional.hessian(lambda x: fl.loss(unflat(x), batches, N), flat0)


def _ggn(fl, batches, N, unflat, flat0):
    """Explicit sum over supervised positions of J^T (diag(p) - p p^T) J, / N."""
    G = torch.zeros(flat0.numel(), flat0.numel())
    for b in batches:
        J = torch.autograd.functional.jacobian(lambda x: fl.logits(unflat(x), b), flat0)  # [B, T, V, P]
        z = fl.logits(unflat(flat0), b).detach()
        sup = shift_labels(b["labels"]) != IGNORE_INDEX
        for i, t in sup.nonzero().tolist():
            p = z[i, t].softmax(-1)
            Hout = torch.diag(p) - torch.outer(p, p)
            G += J[i, t].T @ Hout @ J[i, t]
    return G / N


@pytest.fixture(scope="module")
def mlp_problem():
    torch.manual_seed(0)
    model = TinyMLPLM(vocab=12, dim=4, hidden=6)  # 186 parameters
    prob = _problem(model, 12)
    fl, params, batches, N, unflat, flat, flat0, V = prob
    H = _hessian(fl, batches, N, unflat, flat0)
    G = _ggn(fl, batches, N, unflat, flat0)
    return prob, H, G


@pytest.fixture(scope="module")
def llama_problem():
    torch.manual_seed(0)
    model = tiny_llama(vocab=16, hidden=8, layers=1, attn="sdpa")  # ~900 parameters, SDPA attention
    prob = _problem(model, 16)
    fl, params, batches, N, unflat, flat, flat0, V = prob
    with fl.curvature_mode():
        H = _hessian(fl, batches, N, unflat, flat0)
        G = _ggn(fl, batches, N, unflat, flat0)
    return prob, H, G


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("impl", ["rev_rev", "fwd_rev", "double_backward"])
@pytest.mark.parametrize("which", ["mlp_problem", "llama_problem"])
def test_exact_matches_explicit_hessian(which, impl, request):
    (fl, params, batches, N, unflat, flat, flat0, V), H, _ = request.getfixturevalue(which)
    backend = ExactHVP(fl, impl)
    with fl.curvature_mode():
        out = backend.hvp(params, batches, N, unflat(V))
    assert backend.last_path == "vmap"  # k directions in one batched call
    assert backend.calls == 1 and backend.vectors == K_DIRS
    assert all(t.dtype == torch.float32 and t.shape[0] == K_DIRS for t in out.values())
    assert _rel(flat(out), V @ H) < 1e-4


@pytest.mark.parametrize("which", ["mlp_problem", "llama_problem"])
def test_ggn_matches_explicit_gauss_newton(which, request):
    (fl, params, batches, N, unflat, flat, flat0, V), H, G = request.getfixturevalue(which)
    backend = GGNHVP(fl)
    with fl.curvature_mode():
        out = backend.hvp(params, batches, N, unflat(V))
    assert backend.last_path == "vmap"
    assert _rel(flat(out), V @ G) < 1e-4
    # a true Gauss-Newton product: PSD, and not the exact Hessian under another name
    assert float(torch.linalg.eigvalsh((G + G.T) / 2).min()) > -1e-6
    assert _rel(G, H) > 0.05


def test_diag_is_elementwise_with_the_supplied_diagonal(mlp_problem):
    (fl, params, batches, N, unflat, flat, flat0, V), H, _ = mlp_problem
    diag = unflat(torch.diagonal(H))
    backend = DiagHVP({7: diag})
    out = backend.hvp(params, batches, N, unflat(V), step=7)
    assert torch.allclose(flat(out), V * torch.diagonal(H))
    with pytest.raises(ValueError, match="no diagonal curvature for step 8"):
        backend.hvp(params, batches, N, unflat(V), step=8)
    with pytest.raises(ValueError, match="needs diag_provider"):
        make_hvp_backend("diag", fl)


def test_vmap_failure_falls_back_to_a_loop_with_a_warning(mlp_problem, monkeypatch, caplog):
    (fl, params, batches, N, unflat, flat, flat0, V), H, G = mlp_problem

    def broken_vmap(fn, *a, **k):
        raise RuntimeError("vmap: no batching rule for this op")

    real_grad = torch.autograd.grad

    def unbatched_grad(*a, **k):
        if k.get("is_grads_batched"):
            raise RuntimeError("batched grad: no batching rule for this op")
        return real_grad(*a, **k)

    monkeypatch.setattr(hvp_mod, "vmap", broken_vmap)
    monkeypatch.setattr(torch.autograd, "grad", unbatched_grad)
    for backend, M in ((ExactHVP(fl, "double_backward"), H), (ExactHVP(fl, "rev_rev"), H), (GGNHVP(fl), G)):
        with caplog.at_level(logging.WARNING, logger="lmcleaner.unlearn.hvp"):
            out = backend.hvp(params, batches, N, unflat(V))
        assert backend.last_path == "loop"
        assert _rel(flat(out), V @ M) < 1e-4
    assert caplog.text.count("falling back to a loop") >= 3


def test_curvature_is_float32_for_a_bf16_model_with_frozen_weights():
    """bf16 weights, LoRA-like frozen part: products are float32 and equal those of a float32
    model holding the same (upcast) values."""
    torch.manual_seed(0)
    m16 = tiny_llama(vocab=16, hidden=8, layers=1).to(torch.bfloat16)
    m32 = tiny_llama(vocab=16, hidden=8, layers=1)
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    trainable = [n for n, _ in m16.named_parameters() if "lm_head" in n or "norm" in n]
    data = make_dataset(4, vocab=16)
    batches = [collate(data, [0, 1, 2])]
    N = count_supervised(batches[0]["labels"])
    outs = []
    for m in (m16, m32):
        fl = FunctionalLM(m, trainable)
        params = {n: p for n, p in m.named_parameters() if n in trainable}
        assert (len(fl.frozen) > 0) == (m is m16)  # frozen bf16 weights upcast once
        V = {n: torch.ones(2, *p.shape) * 1e-3 for n, p in params.items()}
        with fl.curvature_mode():
            out = ExactHVP(fl).hvp(to_compute(params), batches, N, V)
        assert all(t.dtype == torch.float32 for t in out.values())
        outs.append(out)
    for n in outs[0]:
        assert torch.allclose(outs[0][n], outs[1][n], rtol=1e-4, atol=1e-7)


def test_flash_sdpa_is_avoided_for_curvature():
    """The CPU flash SDPA kernel has no forward-mode AD (measured); the backends force the
    math kernel, so the same sdpa model works, in or out of curvature_mode."""
    torch.manual_seed(0)
    m = tiny_llama(vocab=16, hidden=8, layers=1, attn="sdpa")
    fl = FunctionalLM(m, [n for n, _ in m.named_parameters()])
    data = make_dataset(4, vocab=16)
    batches = [collate(data, [0, 1])]
    N = count_supervised(batches[0]["labels"])
    params = to_compute(dict(m.named_parameters()))
    V = {n: torch.randn(1, *p.shape) for n, p in params.items()}
    g = torch.func.grad(lambda p: fl.loss(p, batches, N))
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(g, (params,), ({n: v[0] for n, v in V.items()},))
    a = ExactHVP(fl, "fwd_rev").hvp(params, batches, N, V)
    m.train()
    with fl.curvature_mode():
        assert not m.training
        b = ExactHVP(fl, "double_backward").hvp(params, batches, N, V)
    assert m.training  # mode restored
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6)


def test_non_differentiable_attention_is_switched_to_eager_and_restored():
    class Config:
        _attn_implementation = "flash_attention_2"
        use_cache = True

    class Model(TinyMLPLM):
        def __init__(self):
            super().__init__(vocab=12, dim=4, hidden=6)
            self.config = Config()
            self.calls = []

        def set_attn_implementation(self, impl):
            self.calls.append(impl)
            self.config._attn_implementation = impl

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            return super().forward(input_ids, attention_mask)

    m = Model()
    fl = FunctionalLM(m, [n for n, _ in m.named_parameters()])
    with fl.curvature_mode():
        assert m.config._attn_implementation == "eager"
    assert m.calls == ["eager", "flash_attention_2"]


def test_unknown_mode_is_a_one_line_error(mlp_problem):
    (fl, *_), _, _ = mlp_problem
    for mode in ("hessian", "lowrank"):
        with pytest.raises(ValueError, match="unknown hessian_mode") as err:
            make_hvp_backend(mode, fl)
        assert "\n" not in str(err.value)
