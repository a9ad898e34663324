"""``LMCleanerSampleLevel``: forget samples by optimizer-aware propagation (DESIGN §3)."""

from __future__ import annotations

from ..registry import register_method
from ._correction import LMCleanerMethod


@register_method
class LMCleanerSample(LMCleanerMethod):
    """inject grad L^{-z} - grad L at each step that used z, propagate through the real optimizer"""

    name = "LMCleanerSampleLevel"
    aliases = ("LMCleanerSample",)
    level = "sample"
    algorithm_class = "LMCleanerSampleLevel"
