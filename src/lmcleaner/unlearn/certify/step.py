"""Certification as a post-processing step on any :class:`UnlearnResult`.

``certify_result(session, result, cfg)`` returns a NEW result whose trainable
parameters are ``theta_hat + N``, ``N`` Gaussian with the scale the Gaussian
mechanism needs for ``(cfg.epsilon, cfg.delta)`` at sensitivity ``B``, a bound
on the residual ``||theta_hat - theta'||`` (``bound.py``; ``mechanism.py``),
and records what was done under ``info["certification"]`` (it goes into the
audit record): ``guarantee`` (``formal`` | ``empirical``), ``epsilon``,
``delta``, ``sigma`` (and ``sigma_perp`` with subspace noise), ``bound``,
``bound_source``, ``assumptions``, ``calibration``, ``noise_seed``, ``mode``.

Called from one place, ``UnlearnSession.run(..., certify={...})``
(``trainer.method_args.certify.*``), so every method gets it:

- exact methods (``replay``): the residual is 0, no noise is added;
- methods whose class sets ``certifiable = True`` (the LMCleaner corrections:
  linear propagation with ``optimizer_map=exact``, windowed replay with a frozen
  or linear carry; rollback): the formal bound of ``bound.py``; ``auto`` by the
  method it chose;
- any other method: no formal bound (the derivation relies on the
  correction's first step being exact and its later changes being clipped);
  ``bound=formal_or_empirical`` then measures the residual.

The subspace mode needs separate bounds on the residual's parts inside and
outside the top-r curvature subspace; only a measured residual gives them
(``mechanism.py``), so with a formal bound the noise is isotropic and the
record says so.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..functional import FunctionalLM, Params
from ..result import UnlearnError, UnlearnResult
from .bound import (
    ASSUMPTIONS,
    NoFormalBound,
    ResidualBound,
    empirical_bound,
    formal_residual_bound,
)
from .mechanism import (
    CALIBRATIONS,
    GaussianNoise,
    flatten,
    gaussian_sigma,
    subspace_sigmas,
)

log = logging.getLogger("lmcleaner.unlearn")
BOUNDS = ("formal", "empirical", "formal_or_empirical")


@dataclass
class CertifyConfig:
    """Certified removal (``trainer.method_args.certify.*``), see ``docs/certification.md``.

    ``epsilon``, ``delta``: the indistinguishability target;
    ``subspace_rank``: 0 = isotropic noise on the trainable parameters, r > 0 =
    noise in the top-r curvature subspace plus a smaller isotropic part (needs
    a measured residual, else isotropic);
    ``bound``: ``formal`` (data-independent, refused with a one-line reason when
    none exists), ``empirical`` (measured residual, NOT a formal guarantee),
    ``formal_or_empirical`` (the latter only where the former does not exist);
    ``assume``: ``none`` (proven worst case) or ``lipschitz`` (every step map is
    ``rho``-Lipschitz: an assumption, plain SGD only); ``residual``: a residual
    norm to use for ``empirical`` (null: measured against exact replay);
    ``calibration``: ``analytic`` (Balle & Wang 2018, any epsilon) or ``classic``
    (epsilon < 1); ``seed``: noise seed (null: random, recorded in the audit);
    ``curvature_rows``: retain rows whose loss Hessian defines the subspace;
    ``lanczos_iters``: Lanczos block iterations (null: ``2r + 10`` directions).
    """

    epsilon: float = 1.0
    delta: float = 1e-5
    subspace_rank: int = 0
    bound: str = "formal"
    assume: str = "none"
    rho: float = 1.0
    residual: float | None = None
    calibration: str = "analytic"
    seed: int | None = None
    curvature_rows: int = 32
    lanczos_iters: int | None = None

    def validate(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"trainer.method_args.certify.epsilon={self.epsilon} must be a positive finite number")
        if not 0 < self.delta < 1:
            raise ValueError(f"trainer.method_args.certify.delta={self.delta} must be in (0, 1)")
        if self.subspace_rank < 0:
            raise ValueError(f"trainer.method_args.certify.subspace_rank={self.subspace_rank} must be >= 0")
        for key, value, allowed in (("bound", self.bound, BOUNDS), ("assume", self.assume, ASSUMPTIONS),
                                    ("calibration", self.calibration, CALIBRATIONS)):
            if value not in allowed:
                raise ValueError(f"trainer.method_args.certify.{key}={value!r}: use one of {allowed}")
        if self.calibration == "classic" and self.epsilon >= 1:
            raise ValueError("certify.calibration=classic is valid only for epsilon < 1; use calibration=analytic")
        if self.residual is not None and self.residual < 0:
            raise ValueError(f"trainer.method_args.certify.residual={self.residual} must be >= 0")


def certify_config(value: CertifyConfig | Mapping[str, Any]) -> CertifyConfig:
    """A checked :class:`CertifyConfig` from a mapping (one-line :class:`UnlearnError` otherwise)."""
    if isinstance(value, CertifyConfig):
        cfg = value
    else:
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        if not isinstance(value, Mapping):
            raise UnlearnError("trainer.method_args.certify must be a mapping, e.g. "
                               "trainer.method_args.certify={epsilon:1,delta:1e-5}")
        try:
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CertifyConfig),
                                                      {k: v for k, v in value.items() if v is not None}))
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or getattr(err, "key", "")
            raise UnlearnError(f"bad trainer.method_args.certify.{key}: "
                               f"{str(err).splitlines()[0]}") from None
    try:
        cfg.validate()
    except ValueError as err:
        raise UnlearnError(str(err)) from None
    return cfg


def _method_class(result: UnlearnResult):
    """The registered class that produced the parameters (``auto`` records its choice in ``chosen``)."""
    from ..registry import get_method

    for name in (result.info.get("chosen"), result.info.get("method"), result.method):
        if name:
            try:
                return get_method(name)
            except UnlearnError:
                continue
    return None


def formal_bound_for(session, result: UnlearnResult, cfg: CertifyConfig) -> ResidualBound:
    """The data-independent bound for ``result`` (:class:`NoFormalBound` where none exists).

    Covered: the linear propagation with the exact optimizer map (Lemma 3: its first
    step is the counterfactual step) and the windowed replay (``propagation=replay``:
    its first window IS the counterfactual) with a ``frozen`` or ``linear`` carry; in
    both, every later change of the residual is a difference of clipped (SGD) or
    Adam-bounded updates. Exact methods have ``B = 0``."""
    cls = _method_class(result)
    info = result.info
    if cls is not None and getattr(cls, "exact", False):
        return ResidualBound(0.0, "formal", f"{cls.name} is exact: the result is the retrained model", [])
    if cls is None or not getattr(cls, "certifiable", False):
        raise NoFormalBound(f"no formal bound for method {result.method}: it is derived for the LMCleaner "
                            "corrections and rollback only")
    touched = sorted(info["steps_touched"])
    records = [session.log.record(s) for s in range(touched[0], result.tau)]
    n = sum(t.numel() for t in result.params.values())
    common = {"assume": cfg.assume, "rho": cfg.rho}
    if info.get("propagation") == "replay":
        if info.get("carry") not in ("frozen", "linear"):
            raise NoFormalBound(f"no formal bound for the windowed correction with carry={info.get('carry')}: it "
                                "applies the optimizer-state deviation with a stale second moment; use carry=frozen "
                                "or carry=linear")
        if session.spec.name.lower() == "sgd" and session.spec.momentum:
            raise NoFormalBound("no formal bound for the windowed correction of an SGD-momentum run: the carried "
                                "buffer deviation is not covered; use the linear propagation")
        if cfg.assume != "none":
            raise NoFormalBound("certify.assume=lipschitz is derived for the linear propagation's columns")
        return formal_residual_bound(session.spec, records, touched, result.tau, n, level="sample",
                                     damping=float(info.get("damping") or 0.0) if info["carry"] == "linear" else 0.0,
                                     exact_until=int(info["windows"][0]["end"]), **common)
    if info.get("tail_steps"):
        raise NoFormalBound(f"no formal bound for a linear propagation with an exact tail ({info['tail_steps']} "
                            "steps replayed from the corrected state): the bound follows the propagation to tau; "
                            "use trainer.method_args.tail=0")
    if cfg.assume != "none" and info.get("curvature_point") == "midpoint":
        # Theorem 2 assumes the correction's map d -> d - eta (clip(g + H_s d) - clip(g) + ...) is
        # rho-Lipschitz; at the midpoint the curvature moves with d and the map is not that one
        raise NoFormalBound("certify.assume=lipschitz is stated for the curvature at the recorded point; use "
                            "trainer.method_args.curvature_point=recorded (or no assumption)")
    if info.get("optimizer_map") != "exact":
        # the derivation needs an exact first step and clipped later changes (CorrectionMethod records
        # optimizer_map); the tangent map is not covered
        raise NoFormalBound(f"no formal bound for method {result.method} with optimizer_map="
                            f"{info.get('optimizer_map')}: it is derived for optimizer_map=exact")
    return formal_residual_bound(session.spec, records, touched, result.tau, n, level=info.get("level", "sample"),
                                 K=info.get("K"), damping=float(info.get("damping") or 0.0), **common)


def measured_residual(session, result: UnlearnResult, oracle: Params | None = None) -> tuple[torch.Tensor, dict]:
    """``theta_hat - theta'`` flat (sorted names) against exact replay (or the given oracle)."""
    extra: dict[str, Any] = {}
    if oracle is None:
        if result.info.get("level") == "batch":
            raise UnlearnError("a batch-level result's counterfactual zeroes whole steps, which replay does not "
                               "compute: give trainer.method_args.certify.residual to certify it empirically")
        t0 = time.perf_counter()
        touched = session.steps_for(result.forget_ids)
        cf = session.replayer.counterfactual(result.forget_ids, start=touched[0], end=result.tau)
        oracle = cf.params
        extra = {"replayed_steps": cf.steps_replayed, "replay_seconds": time.perf_counter() - t0}
    missing = sorted(set(result.params) - set(oracle))
    if missing:
        raise UnlearnError(f"the oracle lacks parameters {missing[:3]}")
    names = sorted(result.params)
    return flatten(result.params, names) - flatten({n: oracle[n] for n in names}, names), extra


def hessian_basis(fl: FunctionalLM, params: Params, batches: list, normaliser: float, r: int, seed: int = 0,
                  iters: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``r`` (largest magnitude) eigenpairs of the Hessian of ``fl``'s loss on ``batches``
    at ``params`` by Lanczos over exact HVPs: ``(eigvals[r], basis [n, r])``, the basis flat
    in sorted-name order (the layout of :class:`GaussianNoise`)."""
    from ..hvp.exact import ExactHVP
    from ..lanczos import flatten_batch, lanczos

    compute = {n: p.detach().float() for n, p in params.items()}
    hvp = ExactHVP(fl)
    with fl.curvature_mode():
        res = lanczos(lambda V: hvp.hvp(compute, batches, normaliser, V), compute, r, iters=iters, seed=seed,
                      block=4)
    return res.eigvals, flatten_batch(res.eigvecs, sorted(params))


def curvature_basis(session, params: Params, exclude: list[int], r: int, rows: int = 32, seed: int = 0,
                    iters: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hessian_basis` of the mean token loss over the first ``rows`` training rows
    not in ``exclude`` (retained data: the subspace does not read the forget set)."""
    from ...data.collate import Collator
    from ...train.loss import count_supervised

    ds = session.trainer.dataset
    drop = set(exclude)
    picked = [i for i in range(len(ds)) if i not in drop][:rows]
    batch = Collator(ds.pad_token_id)([ds[i] for i in picked])
    fl = FunctionalLM(session.template, params.keys())
    return hessian_basis(fl, params, [batch], count_supervised(batch["labels"]), r, seed, iters)


def certify_result(session, result: UnlearnResult, cfg: CertifyConfig | Mapping[str, Any],
                   oracle: Params | None = None,
                   basis: tuple[torch.Tensor, torch.Tensor] | None = None) -> UnlearnResult:
    """Add calibrated Gaussian noise to ``result`` (see the module docstring). ``oracle``:
    exact-retrain parameters to measure the residual against (default: replay); ``basis``:
    a precomputed ``curvature_basis`` for the subspace mode (it depends on the model, not on
    the noise seed, so sweeps over epsilon and noise draws compute it once)."""
    cfg = certify_config(cfg)
    t0 = time.perf_counter()
    bound: ResidualBound | None = None
    fallback = None
    if cfg.bound in ("formal", "formal_or_empirical"):
        try:
            bound = formal_bound_for(session, result, cfg)
        except NoFormalBound as err:
            if cfg.bound == "formal":
                raise NoFormalBound(f"{err}; trainer.method_args.certify.bound=empirical certifies against a "
                                    "measured residual instead (not a formal guarantee)") from None
            fallback = str(err)
            log.warning("%s; certifying against a measured residual (empirical, not a formal guarantee)", err)
    residual_vec: torch.Tensor | None = None
    measure: dict[str, Any] = {}
    if bound is None:
        if cfg.residual is not None:
            bound = empirical_bound(cfg.residual, "residual norm supplied by the user (certify.residual)")
        else:
            residual_vec, measure = measured_residual(session, result, oracle)
            bound = empirical_bound(float(residual_vec.norm()), "measured ||theta_hat - theta'|| against exact "
                                    + ("replay" if oracle is None else "retraining (given oracle)"))
    seed = int(cfg.seed) if cfg.seed is not None else secrets.randbits(62)
    n = sum(t.numel() for t in result.params.values())
    record: dict[str, Any] = {}
    if cfg.subspace_rank > 0 and residual_vec is not None and bound.value > 0:
        r = min(cfg.subspace_rank, n - 1)
        eigvals, U = basis if basis is not None else curvature_basis(
            session, result.params, result.forget_ids, r, cfg.curvature_rows, 0, cfg.lanczos_iters)
        if U.shape[1] != r:
            raise UnlearnError(f"the given curvature basis has rank {U.shape[1]}, certify.subspace_rank is {r}")
        b_par = float((U.T @ residual_vec).norm())
        b_perp = math.sqrt(max(float(residual_vec.norm()) ** 2 - b_par ** 2, 0.0))
        bound.parallel, bound.perpendicular = b_par, b_perp
        s_par, s_perp, alpha = subspace_sigmas(cfg.epsilon, cfg.delta, b_par, b_perp, r, n, cfg.calibration)
        noise = GaussianNoise(s_par, s_perp, U, seed)
        record.update(mode="subspace", subspace_rank=r, sigma_perp=s_perp, alpha=alpha,
                      bound_parallel=b_par, bound_perpendicular=b_perp,
                      curvature_eigvals=[float(x) for x in eigvals])
    else:
        sigma = gaussian_sigma(cfg.epsilon, cfg.delta, bound.value, cfg.calibration)
        noise = GaussianNoise(sigma, seed=seed)
        record.update(mode="isotropic")
        if cfg.subspace_rank > 0:
            record["subspace_note"] = ("subspace_rank ignored: only a measured residual splits between the "
                                       "subspace and its complement; with a single bound the noise must be "
                                       "isotropic (sigma_par = sigma_perp)")
    params = noise.add_to(result.params)
    certification = {
        "guarantee": bound.guarantee, "epsilon": cfg.epsilon, "delta": cfg.delta, "sigma": noise.sigma,
        "bound": bound.value, "bound_source": bound.source, "assumptions": bound.assumptions,
        "calibration": cfg.calibration, "noise_seed": seed, "noise_norm": float(flatten(
            {k: params[k].float() - result.params[k].float() for k in params}).norm()),
        "n_params": n, **record, "bound_details": bound.details, **measure,
        "seconds": time.perf_counter() - t0,
    }
    if fallback:
        certification["formal_unavailable"] = fallback
    info = {**result.info, "certification": certification, "certify_config": asdict(cfg)}
    return UnlearnResult(result.method, result.forget_ids, result.tau, params, result.opt_state, info)
