"""``GradDiff`` baseline: gradient ascent on the forget rows, descent on retain rows.

``L = gamma * (-sum_i nll_i / sum_i n_i) + alpha * R`` with ``R`` the retain
rows' token-mean NLL (``retain_loss=NLL``) or the KL of the frozen trained
model to the current one on their answer positions (``retain_loss=KL``).
Liu et al. 2022 ("Continual learning and private unlearning"), as in TOFU
(Maini et al. 2024) and open-unlearning's ``GradDiff`` (defaults
``gamma=1 alpha=1 retain_loss_type=NLL``, ``configs/trainer/GradDiff.yaml``).
Optimisation and retain sampling: ``_ascent``.
"""

from __future__ import annotations

from ..registry import register_method
from ._ascent import RetainConfig
from .grad_ascent import GradAscent


@register_method
class GradDiff(GradAscent):
    """baseline: gamma * (-forget NLL) + alpha * retain loss (NLL or KL), from the final weights"""

    name = "GradDiff"
    aliases = ("grad_diff",)
    Config = RetainConfig  # GradAscent's forget term, plus gamma, alpha and the retain loss
