"""Fidelity to the exact-retrain oracle (DESIGN §4).

- Relative parameter error ``||theta_model - theta_oracle|| / ||theta_original - theta_oracle||``
  over all parameters, accumulated in float64 (a float32 sum of squares over
  millions of parameters loses the small differences we are measuring).
  0 = the oracle itself, 1 = no better than not unlearning at all.
- ``KL(oracle || model)`` of the next-token distributions at the supervised
  answer positions, ``sum_v p_o(v) (log p_o(v) - log p_m(v))``, in float32,
  averaged over all such positions of a split (token-weighted). Both models
  run on the same batch, so nothing of vocabulary size is ever stored.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..telemetry.progress import progress_bar
from ..train.loss import IGNORE_INDEX, shift_labels
from ..data import Collator
from .scoring import _batches, model_device


class ParameterMismatchError(ValueError):
    """The two models do not have the same parameter names/shapes."""


def _named_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def param_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """``||theta_a - theta_b||_2`` over all parameters, float64 accumulation."""
    pa, pb = _named_params(a), _named_params(b)
    if pa.keys() != pb.keys():
        only_a, only_b = sorted(pa.keys() - pb.keys())[:3], sorted(pb.keys() - pa.keys())[:3]
        raise ParameterMismatchError(f"models have different parameters (only in first: {only_a}, "
                                     f"only in second: {only_b})")
    total = 0.0
    for name, ta in pa.items():
        tb = pb[name]
        if ta.shape != tb.shape:
            raise ParameterMismatchError(f"parameter '{name}' has shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
        diff = ta.to(torch.float64) - tb.to(device=ta.device, dtype=torch.float64)
        total += float(diff.square().sum())
    return math.sqrt(total)


def relative_param_error(model: torch.nn.Module, oracle: torch.nn.Module, original: torch.nn.Module) -> float:
    """``||theta_model - theta_oracle|| / ||theta_original - theta_oracle||`` (NaN if the denominator is 0)."""
    denom = param_distance(original, oracle)
    return param_distance(model, oracle) / denom if denom > 0 else math.nan


@torch.no_grad()
def kl_to_oracle(model: torch.nn.Module, oracle: torch.nn.Module, items: Sequence[dict], pad_token_id: int = 0,
                 batch_size: int = 8, progress: bool = False, desc: str = "KL") -> tuple[list[float], list[int]]:
    """Per-sample ``(sum over answer positions of KL(oracle || model), number of positions)``.

    The split's mean KL is ``sum(kl_sums) / sum(counts)``.
    """
    model.eval()
    oracle.eval()
    dev_m, dev_o = model_device(model), model_device(oracle)
    collate = Collator(pad_token_id)
    sums: list[float] = [math.nan] * len(items)
    counts: list[int] = [0] * len(items)
    for idx in progress_bar(_batches([len(x["input_ids"]) for x in items], batch_size), desc=desc,
                            enabled=progress, leave=False):
        batch = collate([{**items[i], "sample_id": i} for i in idx])
        ids, attn = batch["input_ids"], batch["attention_mask"]
        logits_o = oracle(input_ids=ids.to(dev_o), attention_mask=attn.to(dev_o)).logits
        logits_m = model(input_ids=ids.to(dev_m), attention_mask=attn.to(dev_m)).logits
        mask = (shift_labels(batch["labels"]) != IGNORE_INDEX).to(dev_o)
        for row, i in enumerate(idx):
            sel = mask[row]
            # float64: near the oracle the terms p (log p - log q) cancel to ~1e-8 nats and float32
            # rounding made their sum negative (measured: negative KL ratios on recent requests);
            # in blocks of positions so a large vocabulary stays within memory
            o_rows, m_rows = logits_o[row][sel], logits_m[row].to(dev_o)[sel]
            total = 0.0
            for k in range(0, o_rows.shape[0], 64):
                lo = F.log_softmax(o_rows[k:k + 64].double(), dim=-1)
                lm = F.log_softmax(m_rows[k:k + 64].double(), dim=-1)
                po = lo.exp()
                total += float(torch.where(po > 0, po * (lo - lm), torch.zeros_like(po)).sum())  # 0 log 0 = 0
            sums[i] = total
            counts[i] = int(sel.sum())
    return sums, counts
