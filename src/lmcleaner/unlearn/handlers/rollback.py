"""``rollback`` baseline: each injection's one-step optimizer effect, no propagation."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_method
from ._correction import CorrectionMethod


@register_method
class RollbackMethod(CorrectionMethod):
    """baseline: undo each use's one-step update, carried unchanged to tau (no curvature)"""

    name = "rollback"
    aliases = ("Rollback",)

    @dataclass
    class Config:
        level: str = "sample"  # sample | batch

    def reach(self, cfg: Config) -> int:
        return 0

    def algorithm(self, cfg: Config):
        from ..methods import Rollback

        return Rollback(level=cfg.level)
