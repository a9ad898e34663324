"""A tiny, self-contained ground-truth harness for the unlearning engine.

It trains a tiny causal LM with the *real* ``torch.optim`` optimizers
(SGD with momentum/weight decay, AdamW with bias correction), global-norm
clipping, two param groups with different learning rates and a decaying
schedule, gradient accumulation over two micro-batches per step and one
normaliser per step; records ``ReplayedStep`` objects in memory; and reruns
the exact counterfactual (same batches minus the forgotten rows, normaliser
recomputed; or a step's gradient zeroed) = the exact-retrain oracle.

Nothing here uses ``lmcleaner.unlearn``: the oracle is independent of the
engine it judges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from lmcleaner.train.loss import IGNORE_INDEX, count_supervised, token_nll_sum
from lmcleaner.trajectory.types import OptimizerSpec, ParamGroupSpec, ReplayedStep, StepRecord

Params = dict[str, torch.Tensor]


# -- models ---------------------------------------------------------------------
class TinyMLPLM(nn.Module):
    """Token embedding + causal running mean of embeddings -> tanh MLP -> vocab."""

    def __init__(self, vocab: int = 32, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(2 * dim, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None, **_):
        x = self.emb(input_ids)
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        m = m.unsqueeze(-1).to(x.dtype)
        ctx = (x * m).cumsum(1) / m.cumsum(1).clamp_min(1)
        return SimpleNamespace(logits=self.out(torch.tanh(self.fc(torch.cat([x, ctx], -1)))))


def tiny_llama(vocab: int = 32, hidden: int = 16, layers: int = 2, attn: str = "sdpa") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn)


# -- data -----------------------------------------------------------------------
def make_dataset(n: int, vocab: int = 32, seed: int = 0) -> list[dict[str, list[int]]]:
    """Noisy arithmetic sequences (learnable) of varying length and prompt length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(5, 11, (1,), generator=g))
        start = int(torch.randint(0, vocab - 1, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        toks = [(start + i * stride) % (vocab - 1) + 1 for i in range(length)]
        for i in range(length):
            if float(torch.rand((1,), generator=g)) < 0.15:
                toks[i] = int(torch.randint(1, vocab, (1,), generator=g))
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        rows.append({"input_ids": toks, "labels": [IGNORE_INDEX] * prompt + toks[prompt:]})
    return rows


def collate(data: list[dict[str, list[int]]], ids: list[int]) -> dict[str, torch.Tensor]:
    width = max(len(data[i]["input_ids"]) for i in ids)
    inp = torch.zeros(len(ids), width, dtype=torch.long)
    att = torch.zeros(len(ids), width, dtype=torch.long)
    lab = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for r, i in enumerate(ids):
        k = len(data[i]["input_ids"])
        inp[r, :k] = torch.tensor(data[i]["input_ids"])
        att[r, :k] = 1
        lab[r, :k] = torch.tensor(data[i]["labels"])
    return {"input_ids": inp, "attention_mask": att, "labels": lab, "sample_ids": torch.tensor(ids)}


def drop_rows(batch: dict[str, torch.Tensor], forget: set[int]) -> dict[str, torch.Tensor] | None:
    keep = torch.tensor([int(i) not in forget for i in batch["sample_ids"].tolist()])
    if not keep.any():
        return None
    return {k: v[keep] for k, v in batch.items()}


def make_schedule(n: int, epochs: int, rows: int = 2, micro: int = 2, seed: int = 1) -> list[list[list[int]]]:
    """Per step: ``micro`` micro-batches of ``rows`` sample ids, a fresh permutation per epoch."""
    g = torch.Generator().manual_seed(seed)
    per_step = rows * micro
    steps = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).tolist()
        for s in range(0, n - per_step + 1, per_step):
            chunk = perm[s : s + per_step]
            steps.append([chunk[m * rows : (m + 1) * rows] for m in range(micro)])
    return steps


# -- training -------------------------------------------------------------------
@dataclass
class OptCfg:
    name: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None
    lr_ratio: float = 0.5  # second group's lr / first group's
    decay: float = 0.5  # lr_t = lr * (1 - decay * t / T)


@dataclass
class Run:
    final: Params
    steps: list[ReplayedStep] = field(default_factory=list)
    spec: OptimizerSpec | None = None
    final_opt_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def param_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    decay = [n for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    rest = [n for n, _ in model.named_parameters() if n not in decay]
    return decay, rest


def _opt_state(opt: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> dict[str, dict[str, torch.Tensor]]:
    return {names[p]: {k: v.detach().clone() for k, v in st.items() if torch.is_tensor(v)}
            for p, st in opt.state.items()}


def train(
    model_fn: Callable[[], nn.Module],
    data: list[dict[str, list[int]]],
    schedule: list[list[list[int]]],
    cfg: OptCfg,
    *,
    forget: set[int] = frozenset(),
    zero_steps: set[int] = frozenset(),
    n_steps: int | None = None,
    record: bool = False,
    init_seed: int = 0,
) -> Run:
    """Train with real torch optimizers; ``forget``/``zero_steps`` give the exact counterfactual."""
    torch.manual_seed(init_seed)
    model = model_fn()
    decay, rest = param_groups(model)
    named = dict(model.named_parameters())
    lrs0 = [cfg.lr, cfg.lr * cfg.lr_ratio]
    groups = [{"params": [named[n] for n in decay], "weight_decay": cfg.weight_decay, "lr": lrs0[0]},
              {"params": [named[n] for n in rest], "weight_decay": 0.0, "lr": lrs0[1]}]
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                              nesterov=cfg.nesterov)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    spec = OptimizerSpec(
        name=cfg.name, groups=[ParamGroupSpec(decay, cfg.weight_decay, lrs0[0]), ParamGroupSpec(rest, 0.0, lrs0[1])],
        betas=cfg.betas, eps=cfg.eps, momentum=cfg.momentum if cfg.name == "sgd" else 0.0,
        dampening=cfg.dampening, nesterov=cfg.nesterov, max_grad_norm=cfg.max_grad_norm,
    )
    names = {p: n for n, p in named.items()}
    T = len(schedule)
    run = Run(final={}, spec=spec)
    for t, mbs in enumerate(schedule[: n_steps if n_steps is not None else T]):
        full = [collate(data, ids) for ids in mbs]
        batches = [b for b in (drop_rows(b, set(forget)) for b in full) if b is not None]
        N = sum(count_supervised(b["labels"]) for b in batches)
        lrs = [lr * (1 - cfg.decay * t / T) for lr in lrs0]
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        before = {n: p.detach().clone() for n, p in named.items()} if record else None
        state_before = _opt_state(opt, names) if record else None
        for p in named.values():
            p.grad = torch.zeros_like(p)
        loss = 0.0
        if N > 0 and t not in zero_steps:
            for b in batches:
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                l = token_nll_sum(out.logits, b["labels"]) / N
                l.backward()
                loss += float(l.detach())
        grad = {n: p.grad.detach().clone() for n, p in named.items()}
        gnorm = math.sqrt(sum(float((g ** 2).sum()) for g in grad.values()))
        clipped = False
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
            clipped = gnorm > cfg.max_grad_norm
        opt.step()
        if record:
            # as the trainer records it: micro_batches as planned, excluded ids listed, batches as trained
            dropped = sorted({i for m in mbs for i in m} & set(forget))
            rec = StepRecord(step=t, epoch=t * 4 // max(1, len(data)), micro_batches=[list(m) for m in mbs],
                             lrs=[g["lr"] for g in opt.param_groups], normaliser=N, loss=loss, grad_norm=gnorm,
                             clipped=clipped, rng_seed=0, excluded=dropped)
            run.steps.append(ReplayedStep(record=rec, params=before, batches=batches, grad=grad,
                                          opt_state=state_before))
    run.final = {n: p.detach().clone() for n, p in named.items()}
    run.final_opt_state = _opt_state(opt, names)
    return run


# -- metrics ----------------------------------------------------------------------
def dist(a: Params, b: Params) -> float:
    return math.sqrt(sum(float(((a[n].float() - b[n].float()) ** 2).sum()) for n in a))


def rel_error(theta: Params, delta: Params, retrain: Params, sign: float = 1.0) -> float:
    """``||theta + sign*delta - theta_re|| / ||theta - theta_re||`` (no-op = 1)."""
    hat = {n: theta[n].float() + sign * delta[n] for n in theta}
    return dist(hat, retrain) / dist(theta, retrain)


def occurrences(steps: list[ReplayedStep], sample: int) -> list[int]:
    return [s.step for s in steps if sample in s.record.sample_ids]


class Counting:
    """An iterable over steps that counts how often each step is yielded (one sweep = each once)."""

    def __init__(self, steps: list[ReplayedStep]) -> None:
        self.steps = steps
        self.yielded: list[int] = []
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        for s in self.steps:
            self.yielded.append(s.step)
            yield s
