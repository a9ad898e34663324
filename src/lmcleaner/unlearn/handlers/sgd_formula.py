"""``sgd_formula`` baseline: propagation with the plain SGD formula whatever the optimizer."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_method
from ._correction import CorrectionMethod, PropagationConfig, hvp_options


@register_method
class SGDFormulaMethod(CorrectionMethod):
    """baseline: d <- d - eta (H d + e), ignoring momentum, Adam scaling and clipping"""

    name = "sgd_formula"
    aliases = ("SGDFormula",)

    @dataclass
    class Config(PropagationConfig):
        level: str = "sample"  # sample | batch

    def algorithm(self, cfg: Config):
        from ..methods import SGDFormula

        # auto: the baseline keeps the plain formula's recorded point (H(theta_s) d); midpoint if asked
        point = "recorded" if cfg.curvature_point == "auto" else cfg.curvature_point
        return SGDFormula(level=cfg.level, K=cfg.K, hessian_mode=cfg.hessian_mode, damping=cfg.damping,
                          hvp_options=hvp_options(cfg), curvature_point=point)
