"""What every unlearning method returns, and the one-line error type of a request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: `lmcleaner unlearn --help` lists the methods without importing torch
    import torch


class UnlearnError(ValueError):
    """A one-line problem with an unlearning request (bad ids, window, fingerprints, method args)."""


@dataclass
class UnlearnResult:
    method: str
    forget_ids: list[int]
    tau: int
    params: dict[str, torch.Tensor]  # the unlearned trainable parameters at tau
    opt_state: dict[str, dict[str, torch.Tensor]] | None  # corrected optimizer state (None: not corrected)
    info: dict[str, Any] = field(default_factory=dict)  # cost, norms, steps, settings (JSON-able)
