"""``SimNPO`` baseline: reference-free NPO with length normalisation (Fan et al. 2024, arXiv:2410.07163).

    F = -(2/beta) * mean_i logsigmoid(beta * (nll_i / n_i - delta)),

with ``nll_i / n_i`` the token-mean answer NLL of row ``i``. The paper writes
``-(2/beta) logsigmoid(-(beta/|y|) log pi_theta(y|x) - gamma_paper)``;
``delta = gamma_paper / beta`` (open-unlearning's parameterisation).
``L = gamma F + alpha R``. Defaults: open-unlearning's
``configs/trainer/SimNPO.yaml`` (``beta=4.5 delta=0 gamma=0.125 alpha=1``
retain NLL; taken there from the authors' TOFU config, where ``gamma`` is
``npo_coeff``). No reference model. Optimisation and retain sampling: ``_ascent``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..registry import register_method
from ._ascent import AscentMethod, RetainConfig

if TYPE_CHECKING:
    import torch


def simnpo_terms(nll: torch.Tensor, count: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """Per-row ``-(2/beta) logsigmoid(beta (nll/n - delta))`` (rows without answer tokens count n=1)."""
    import torch.nn.functional as F

    return -2.0 / beta * F.logsigmoid(beta * (nll / count.clamp_min(1) - delta))


@register_method
class SimNPO(AscentMethod):
    """baseline: length-normalised, reference-free NPO plus a retain term"""

    name = "SimNPO"
    aliases = ("simnpo",)
    forget_reduce = "rows"

    @dataclass
    class Config(RetainConfig):
        gamma: float = 0.125  # weight of the forget term (npo_coeff of the authors' TOFU config)
        beta: float = 4.5  # inverse temperature
        delta: float = 0.0  # reward margin on the token-mean NLL (paper's gamma / beta)

        def validate(self) -> None:
            super().validate()
            if self.beta <= 0:
                raise ValueError(f"trainer.method_args.beta={self.beta}: must be > 0")

    def forget_terms(self, cfg, nll, count, ref_nll):
        return simnpo_terms(nll, count, cfg.beta, cfg.delta)
