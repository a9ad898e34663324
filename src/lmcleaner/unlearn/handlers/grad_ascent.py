"""``GradAscent`` baseline: maximise the forget rows' NLL from the trained weights.

``L = -sum_i nll_i / sum_i n_i`` (minus the token-mean NLL of the forget
batch), minimised with the shared fine-tuning loop of ``_ascent`` (AdamW,
open-unlearning's TOFU defaults). Uses no trajectory and no retain data, so
it shows what the recorded trajectory buys; it degrades the model without
bound if run long enough.
"""

from __future__ import annotations

from ..registry import register_method
from ._ascent import AscentConfig, AscentMethod


@register_method
class GradAscent(AscentMethod):
    """baseline: gradient ascent on the forget rows' NLL from the final weights (no trajectory)"""

    name = "GradAscent"
    aliases = ("grad_ascent",)
    Config = AscentConfig
    forget_reduce = "tokens"

    def forget_terms(self, cfg, nll, count, ref_nll):
        return -nll
