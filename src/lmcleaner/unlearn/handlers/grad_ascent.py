"""GradAscent baseline: maximise the forget-set loss for a few steps.

The common open-unlearning baseline; it uses no trajectory, so it shows what
the recorded trajectory buys. Plain SGD on ``-loss`` (token mean over the
forget rows), starting from the final weights.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ...data.collate import Collator
from ...train.loss import token_nll_sum
from ..registry import register_method
from ..result import UnlearnResult


def grad_ascent(model: torch.nn.Module, dataset, forget_ids: list[int], lr: float = 1e-4, steps: int = 5,
                batch_size: int = 8) -> dict[str, float]:
    """Updates ``model``'s trainable parameters in place; returns summary stats."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    collate = Collator(dataset.pad_token_id)
    model.train()
    losses = []
    for _ in range(steps):
        for k in range(0, len(forget_ids), batch_size):
            batch = collate([dataset[i] for i in forget_ids[k:k + batch_size]])
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            loss = token_nll_sum(out.logits, batch["labels"]) / n
            opt.zero_grad(set_to_none=True)
            (-loss).backward()
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return {"forget_loss_first": losses[0] if losses else float("nan"),
            "forget_loss_last": losses[-1] if losses else float("nan"), "updates": len(losses)}


@register_method
class GradAscent:
    """baseline: SGD on -loss of the forget rows from the final weights (no trajectory)"""

    name = "GradAscent"
    aliases = ("grad_ascent",)
    exact = False

    @dataclass
    class Config:
        lr: float = 1e-4  # learning rate of the ascent
        steps: int = 5  # epochs over the forget rows

    def run(self, session, ids: list[int], cfg: Config) -> UnlearnResult:
        t0 = time.perf_counter()
        touched = session.steps_for(ids)
        theta, _ = session.replayer.state_at(session.tau)
        model = copy.deepcopy(session.template)
        model.load_state_dict(theta, strict=False)
        stats = grad_ascent(model, session.trainer.dataset, ids, lr=cfg.lr, steps=cfg.steps)
        params = {n: p.detach().clone() for n, p in model.named_parameters() if n in theta}
        info = {"method": self.name, "steps_touched": touched, "lr": cfg.lr, "ascent_epochs": cfg.steps, **stats,
                "grad_equivalents": float(stats["updates"]), "grad_equivalents_total": float(stats["updates"]),
                "recovery_steps": 0, "seconds": time.perf_counter() - t0, "K": None, "hessian_mode": None}
        return UnlearnResult(self.name, ids, session.tau, params, None, info)
