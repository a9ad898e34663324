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

Paths in ``checkpoints.json`` are relative to the log directory
(``../checkpoint-40``, ``anchors/step-7``), so a copied or moved run reads
its own checkpoints; logs written before that stored absolute paths, which
are still read (the copy's own ``checkpoint-<t>`` wins when it exists). Each
point also records the SHA-256 of its files (``files``), checked when it is
loaded: a checkpoint that was corrupted or comes from another run is refused.

*Barriers* are resume steps where the step budget (``training.max_steps``)
changed: the resumed trainer built its LR schedule for the new budget, so a
replay must not run across such a step; it restarts from the resume
checkpoint, with the new schedule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

CHECKPOINT, ANCHOR = "checkpoint", "anchor"


@dataclass(frozen=True)
class RestorePoint:
    step: int
    path: Path
    kind: str = CHECKPOINT
    files: dict[str, str] | None = field(default=None, compare=False, hash=False)  # file -> sha256

    def to_json(self, log_dir: Path | None = None) -> dict[str, Any]:
        path = str(self.path)
        if log_dir is not None:
            path = os.path.relpath(os.path.abspath(self.path), os.path.abspath(log_dir))
        out: dict[str, Any] = {"step": self.step, "path": path, "kind": self.kind}
        if self.files:
            out["files"] = dict(self.files)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], log_dir: Path, run_dir: Path | None = None) -> "RestorePoint":
        p = Path(d["path"])
        kind = str(d.get("kind", CHECKPOINT))
        if not p.is_absolute():
            p = Path(os.path.normpath(log_dir / p))
        else:  # a log written before paths were relative: prefer this copy's own checkpoint
            local = (log_dir / "anchors" / p.name) if kind == ANCHOR else (run_dir / p.name if run_dir else None)
            if local is not None and local.is_dir():
                p = local
        files = d.get("files")
        return cls(int(d["step"]), p, kind, dict(files) if isinstance(files, dict) else None)


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
