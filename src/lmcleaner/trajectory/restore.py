"""Restore points: where an exact ``theta_t`` (with optimizer state) is on disk.

Why a rule of its own: two kinds exist and an online deletion makes some of
them unusable.

- ``checkpoint``: the trainer's ``checkpoint-<t>`` (state before step ``t``).
- ``anchor``: written by the recorder right after an online unlearning
  correction was applied before step ``t`` (``anchors/step-<t>``), because
  the correction changes the parameters outside any recorded step, so no
  replay from an earlier point can reproduce it.

A restore point ``p`` is valid for reaching ``theta_s`` by replaying the
recorded steps ``p..s-1`` iff ``p <= s`` and no correction happened in
between: no event at a step ``e`` with ``p < e <= s``, and for a trainer
checkpoint also none at ``e == p`` (that checkpoint holds the state *before*
the correction).

*Barriers* are resume steps where the step budget (``training.max_steps``)
changed: the resumed trainer built its LR schedule for the new budget, so a
replay must not run across such a step; it restarts from the resume
checkpoint, with the new schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

CHECKPOINT, ANCHOR = "checkpoint", "anchor"


@dataclass(frozen=True)
class RestorePoint:
    step: int
    path: Path
    kind: str = CHECKPOINT

    def to_json(self, log_dir: Path | None = None) -> dict[str, Any]:
        path = self.path
        if log_dir is not None:
            try:
                path = self.path.relative_to(log_dir)
            except ValueError:
                pass
        return {"step": self.step, "path": str(path), "kind": self.kind}

    @classmethod
    def from_json(cls, d: dict[str, Any], log_dir: Path) -> "RestorePoint":
        p = Path(d["path"])
        return cls(int(d["step"]), p if p.is_absolute() else log_dir / p, str(d.get("kind", CHECKPOINT)))


def is_valid(point: RestorePoint, target: int, event_steps: Iterable[int], barriers: Iterable[int] = ()) -> bool:
    if point.step > target:
        return False
    for e in event_steps:
        if point.step < e <= target or (e == point.step and point.kind == CHECKPOINT):
            return False
    return not any(point.step < b <= target for b in barriers)


def pick(points: Iterable[RestorePoint], target: int, event_steps: Iterable[int],
         barriers: Iterable[int] = ()) -> RestorePoint | None:
    """The latest valid restore point for ``theta_target`` (anchors win ties)."""
    events, walls = list(event_steps), list(barriers)
    best: RestorePoint | None = None
    for p in points:
        if is_valid(p, target, events, walls):
            if best is None or p.step > best.step or (p.step == best.step and p.kind == ANCHOR):
                best = p
    return best
