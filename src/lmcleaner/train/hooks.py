"""What the trainer expects from a trajectory recorder (the do-nothing version).

The real one is ``lmcleaner.trajectory.TrainingLogger``; the trainer only
talks to this interface, so it never branches on "is recording on".
"""

from __future__ import annotations

from typing import Any

from .engine import NullObserver


class NullRecorder(NullObserver):
    log_dir = None

    def on_train_begin(self, engine, meta: dict[str, Any], resume_step: int) -> None:
        """Called once (main process) before the first step; ``resume_step`` > 0 when resuming."""

    def wants_checkpoint(self, step: int) -> bool:
        """Should the trainer write ``checkpoint-<step>`` (state after ``step`` steps)?"""
        return False

    def on_checkpoint(self, step: int, path) -> None:
        """A checkpoint holding ``theta_step`` now exists at ``path``."""

    def required_checkpoints(self, step: int) -> set[int]:
        """Checkpoint steps the recorder still needs (protected from rotation)."""
        return set()

    def on_unlearn_event(self, event: dict[str, Any]) -> None:
        """An online deletion request was applied before step ``event['step']``."""

    def close(self) -> None:
        """Flush and stop writing (idempotent)."""
