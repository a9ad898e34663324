"""Token-level causal-LM loss shared by training, replay and unlearning.

The step loss is ``sum of supervised-token NLL over the whole step / N`` where
``N`` is the number of supervised tokens in the *whole* optimizer step (all
micro-batches, all ranks). Using one normaliser for the whole step makes
gradient accumulation exact and lets the unlearning counterfactual recompute
the normaliser over the remaining samples (DESIGN §3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.labels import IGNORE_INDEX


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits position ``i`` predicting token ``i+1``."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def count_supervised(labels: torch.Tensor) -> int:
    """Number of tokens that carry loss (after the causal shift)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL over supervised positions, computed in float32 (on the logits' device)."""
    target = shift_labels(labels.to(logits.device))
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (NLL sum, supervised token count), float32."""
    target = shift_labels(labels)
    nll = F.cross_entropy(
        logits.float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = target != IGNORE_INDEX
    return (nll * mask).sum(-1), mask.sum(-1)
