"""``NPO`` baseline: Negative Preference Optimization (Zhang et al. 2024, arXiv:2404.05868).

DPO with the forget answer as the only, losing response, against the frozen
trained model ``pi_ref`` (theta at tau):

    F = (2/beta) * mean_i log(1 + (pi_theta(y_i|x_i) / pi_ref(y_i|x_i))^beta)
      = -(2/beta) * mean_i logsigmoid(beta * (nll_i - nll_ref_i)),

with ``nll_i = -log pi_theta(y_i|x_i)`` summed over the answer tokens. At
``theta = theta_ref`` it is ``(2/beta) log 2`` and its gradient is GradAscent's
summed-NLL gradient; as ``pi_theta(y|x) -> 0`` the weight ``sigmoid(beta (log
pi_theta - log pi_ref))`` vanishes, which is what slows NPO's collapse.
``L = gamma F + alpha R`` (the paper's NPO+RT; ``alpha=0`` is plain NPO).
Defaults: open-unlearning's ``configs/trainer/NPO.yaml`` (``beta=0.1 alpha=1
gamma=1`` retain NLL) and the paper's beta 0.1 on TOFU. Optimisation,
retain sampling and cost (the reference forward counts 1/3 of a gradient):
``_ascent``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..registry import register_method
from ._ascent import AscentMethod, RetainConfig

if TYPE_CHECKING:
    import torch


def npo_terms(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row ``-(2/beta) logsigmoid(beta (nll - nll_ref))`` (averaged over rows by the caller)."""
    import torch.nn.functional as F

    return -2.0 / beta * F.logsigmoid(beta * (nll - ref_nll))


@register_method
class NPO(AscentMethod):
    """baseline: negative preference optimisation against the frozen trained model, plus a retain term"""

    name = "NPO"
    aliases = ("npo",)
    forget_reduce = "rows"
    needs_reference = True

    @dataclass
    class Config(RetainConfig):
        beta: float = 0.1  # inverse temperature of the preference loss

        def validate(self) -> None:
            super().validate()
            if self.beta <= 0:
                raise ValueError(f"trainer.method_args.beta={self.beta}: must be > 0")

    def forget_terms(self, cfg, nll, count, ref_nll):
        return npo_terms(nll, ref_nll, cfg.beta)
