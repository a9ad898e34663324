"""The one object that owns everything resume needs besides tensors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps
    epoch: int = 0
    total_steps: int = 0
    excluded: dict[int, int] = field(default_factory=dict)  # sample id -> first step it was excluded from
    processed_requests: list[str] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations without improvement (early stopping)
    checkpoint_reasons: dict[int, list[str]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step loss/lr/grad norm
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    unlearn_events: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["excluded"] = {str(k): v for k, v in self.excluded.items()}
        d["checkpoint_reasons"] = {str(k): v for k, v in self.checkpoint_reasons.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainState":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["excluded"] = {int(k): int(v) for k, v in d.get("excluded", {}).items()}
        d["checkpoint_reasons"] = {int(k): v for k, v in d.get("checkpoint_reasons", {}).items()}
        return cls(**d)
