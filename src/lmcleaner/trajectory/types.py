"""Plain data types shared by the trainer, the recorder, the replayer and the
unlearning engine. They carry no behaviour so every part can depend on them.

Conventions (DESIGN §2):
- step ``t`` is 0-based and counts optimizer steps; ``theta_t`` is the
  parameter vector *before* step ``t`` is applied.
- A step's batch is a list of micro-batches in execution order: micro-step
  major, rank minor (``micro_batches[m * world_size + r]``). Each micro-batch
  is a list of stable sample ids (dataset row indices).
- ``lrs`` are the learning rates *applied* at step ``t`` (one per optimizer
  param group), never the next step's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class ParamGroupSpec:
    """One optimizer param group: which trainable parameters, its weight decay."""

    names: list[str]
    weight_decay: float
    base_lr: float


@dataclass
class OptimizerSpec:
    """What the unlearning engine needs to linearise the real optimizer update.

    ``name`` is ``"adamw"`` or ``"sgd"`` (PyTorch semantics: SGD weight decay is
    coupled, i.e. added to the gradient; AdamW weight decay is decoupled).
    """

    name: str
    groups: list[ParamGroupSpec]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    max_grad_norm: float | None = None  # None or <= 0: no clipping

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "OptimizerSpec":
        d = dict(d)
        d["groups"] = [ParamGroupSpec(**g) for g in d["groups"]]
        d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class StepRecord:
    """The per-step facts the recorder writes (bytes per step, not megabytes)."""

    step: int
    epoch: int
    micro_batches: list[list[int]]
    lrs: list[float]
    normaliser: int  # supervised tokens in the whole step (all micro-batches, all ranks)
    loss: float  # the step loss (token mean over the step)
    grad_norm: float  # global norm before clipping
    clipped: bool
    rng_seed: int  # the per-step seed the trainer set before the step (dropout etc.)
    excluded: list[int] = field(default_factory=list)  # ids dropped from this step by earlier deletion requests

    @property
    def sample_ids(self) -> list[int]:
        return [i for mb in self.micro_batches for i in mb]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StepRecord":
        return cls(**d)


@dataclass
class ReplayedStep:
    """Everything the unlearning engine needs about step ``t``.

    ``params`` are the trainable parameters ``theta_t`` (exact, before the
    step). ``grad`` is the *unclipped* gradient of the step loss at
    ``theta_t`` (the engine derives the clipped one from ``grad_norm`` and the
    optimizer spec). ``opt_state`` is the optimizer state *before* the step,
    keyed by parameter name: ``{"exp_avg", "exp_avg_sq", "step"}`` for AdamW,
    ``{"momentum_buffer"}`` for SGD with momentum (absent at the first step).
    """

    record: StepRecord
    params: dict[str, torch.Tensor]
    batches: list[dict[str, torch.Tensor]]  # collated micro-batches: input_ids, attention_mask, labels, sample_ids
    grad: dict[str, torch.Tensor] | None = None
    opt_state: dict[str, dict[str, torch.Tensor]] | None = None

    @property
    def step(self) -> int:
        return self.record.step
