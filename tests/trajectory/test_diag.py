"""Diag mode: a per-step diagonal curvature estimate at the recorded theta_t."""

import types

import torch

from lmcleaner.train.engine import step_seed
from lmcleaner.trajectory import TrajectoryLog, TrajectoryReplayer
from lmcleaner.trajectory.curvature import hutchinson_diag

from .conftest import log_dir_of, rec_config, train_capturing


def test_hutchinson_diag_is_recorded_at_theta_t(tmp_path):
    cfg = rec_config(tmp_path, "training.max_steps=4", "training_logger.storage=diag")
    trainer, rec = train_capturing(cfg)
    log = TrajectoryLog(log_dir_of(cfg))
    assert log.meta["diag_estimator"] == "hutchinson" and log.has_diag and not log.has_updates
    provider = log.diag_provider()
    rp = TrajectoryReplayer(log)
    for st in rp.iter_steps(0, 4):
        d = provider(st.step)
        assert d.keys() == st.params.keys() and all(v.dtype == torch.float32 for v in d.values())
        # recomputing at the replayed theta_t with the step's seed gives the recorded estimate
        again = hutchinson_diag(rp.engine.unwrapped, st.params, st.batches, st.record.normaliser,
                                seed=step_seed(cfg.training.seed, st.step, 0))
        assert all(torch.allclose(again[n], d[n], rtol=1e-5, atol=1e-8) for n in d)
        assert any(bool((v != 0).any()) for v in d.values())


def test_empirical_fisher_is_the_squared_unclipped_gradient(tmp_path):
    cfg = rec_config(tmp_path, "training.max_steps=3", "training_logger.compute_diag_h=true",
                     "training_logger.diag_estimator=empirical_fisher")
    trainer, rec = train_capturing(cfg)
    log = TrajectoryLog(log_dir_of(cfg))
    assert log.storage == "light" and log.meta["diag_estimator"] == "empirical_fisher"
    for t in range(3):
        d = log.diag(t)
        assert all(torch.equal(d[n], rec.grads[t][n] ** 2) for n in d)


class _ToyLM(torch.nn.Module):
    """Embedding + tanh + head: small enough for an exact Hessian."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(7, 3)
        self.head = torch.nn.Linear(3, 7)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return types.SimpleNamespace(logits=self.head(torch.tanh(self.emb(input_ids))))


def test_hutchinson_estimates_the_exact_hessian_diagonal():
    from torch.func import functional_call

    from lmcleaner.train.loss import token_nll_sum

    model = _ToyLM()
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    est = hutchinson_diag(model, params, [batch], normaliser=8, seed=3, probes=800)
    names = list(params)
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].flatten() for n in names])

    def loss(x):
        parts, k = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = x[k:k + s.numel()].view(s)
            k += s.numel()
        return token_nll_sum(functional_call(model, parts, (ids,)).logits, ids) / 8

    exact = torch.autograd.functional.hessian(loss, flat).diagonal()
    got = torch.cat([est[n].flatten() for n in names])
    assert torch.corrcoef(torch.stack([got, exact]))[0, 1] > 0.98
    assert (got - exact).abs().max() < 0.2 * exact.abs().max()
