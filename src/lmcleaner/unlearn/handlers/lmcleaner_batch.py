"""``LMCleanerBatchLevel``: forget whole steps (their gradient becomes zero, the optimizer still ticks)."""

from __future__ import annotations

from ..registry import register_method
from ._correction import LMCleanerMethod


@register_method
class LMCleanerBatch(LMCleanerMethod):
    """zero the gradient of every step that used a forgotten sample, propagate through the optimizer"""

    name = "LMCleanerBatchLevel"
    aliases = ("LMCleanerBatch",)
    level = "batch"
    algorithm_class = "LMCleanerBatchLevel"
