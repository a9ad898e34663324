"""GradAscent baseline: maximise the forget-set loss for a few steps.

The common open-unlearning baseline; it uses no trajectory, so it shows what
the recorded trajectory buys. Plain SGD on ``-loss`` (token mean over the
forget rows), starting from the final weights.
"""

from __future__ import annotations

import torch

from ..data.collate import Collator
from ..train.loss import token_nll_sum


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
