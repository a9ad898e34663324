"""The HVP backend protocol and its registry.

One interface for all backends::

    backend.hvp(params, batches, normaliser, vectors, step=None) -> Params

``params`` is ``theta_t`` (float32), ``batches`` the step's micro-batches,
``normaliser`` the step's supervised-token count and ``vectors`` a *batch of
k directions* as a dict ``name -> tensor[k, *param.shape]`` (float32). The
result has the same layout. The k directions are batched with
``torch.func.vmap`` (``is_grads_batched`` for double backward, which is
vmap inside autograd); if batching fails for a model the backend falls back to a
python loop over the k directions, logs a warning once and records the path
it took in ``last_path`` (``"vmap"`` or ``"loop"``).

Backends register themselves by name (``@register_backend``), one file per
backend in this package; ``make_hvp_backend(mode, fl, ...)`` builds one.

Backends that evaluate the model implement ``_product_sum``: the
*unnormalised* product summed over the micro-batches they are given, of the
micro-batch objectives ``l_b = S_b + w A(B_b)`` (``unlearn.functional``; the
router term ``w A`` only for a mixture of experts trained with router
losses). The base class computes the step's router weight ``w = N~/M+`` from
*all* its micro-batches, gives each process its share of them
(``fl.dp.share``), all-reduces the partial sums (``fl.dp.sum``) and divides by
``N~ = max(N, 1)`` once, after the reduction, so several ranks give one
process's numbers up to float summation order. Backends that do not look at
the batches (``diag``) override ``_hvp``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmcleaner.unlearn.functional import Batch, FunctionalLM, Params, step_scale

log = logging.getLogger("lmcleaner.unlearn.hvp")

DiagProvider = Union[Callable[[int], Params], Mapping[int, Params]]
BACKENDS: dict[str, type[HVPBackend]] = {}


def register_backend(cls: type[HVPBackend]) -> type[HVPBackend]:
    """Class decorator: make ``cls`` available as ``hessian_mode=cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty ``name``")
    BACKENDS[cls.name] = cls
    return cls


class HVPBackend(ABC):
    """Curvature of the step loss times a batch of directions (see module doc)."""

    name: str = ""
    fl: FunctionalLM

    def __init__(self) -> None:
        self.calls = 0  # batched calls
        self.vectors = 0  # directions multiplied
        self.last_path: str | None = None
        self._warned = False
        self.seconds = 0.0  # wall time in products
        self.row_seconds = 0.0  # sum over calls of seconds / rows of the call's batches

    #: measured cost of one direction in gradient evaluations (k = 1), see ``exact.py``
    cost_in_grads: float = 0.0
    #: the product is the curvature at the ``params`` passed (true), not a recorded or cached
    #: one: only then can the propagation ask for it at the midpoint ``theta + D/2``
    evaluates_where_asked: bool = False

    def describe(self) -> dict[str, Any]:
        """Backend-specific counts and settings for the audit record (none by default)."""
        return {}

    @classmethod
    def build(cls, fl: FunctionalLM, *, diag_provider: DiagProvider | None = None, **options: Any) -> HVPBackend:
        """Construct from the common context; backends override when they need more."""
        return cls(fl, **options)

    def hvp(
        self, params: Params, batches: list[Batch], normaliser: float, vectors: Params, *, step: int | None = None
    ) -> Params:
        k = next(iter(vectors.values())).shape[0]
        self.calls += 1
        self.vectors += k
        if self.loss_is_zero(batches, normaliser):
            return {n: torch.zeros_like(v) for n, v in vectors.items()}
        # the CPU flash SDPA kernel supports neither forward-mode AD nor double backward
        t0 = time.perf_counter()
        with sdpa_kernel([SDPBackend.MATH]):
            out = self._hvp(params, batches, normaliser, vectors, step)
        dt = time.perf_counter() - t0
        self.seconds += dt
        fl = getattr(self, "fl", None)
        local = fl.dp.share(batches) if fl is not None else batches  # the rows this process evaluated
        self.row_seconds += dt / max(1, sum(int(b["input_ids"].shape[0]) for b in local))
        return out

    def loss_is_zero(self, batches: list[Batch], normaliser: float) -> bool:
        """The step loss is identically 0: nothing supervised, and no router term (dense model,
        or no micro-batch holding a sample)."""
        fl = getattr(self, "fl", None)
        return normaliser <= 0 and (fl is None or fl.router_weight(batches, normaliser) == 0.0)

    def measured_grad_equivalents(self, seconds_per_grad_row: float | None) -> float | None:
        """All products so far in gradients *as measured in this process*: each call's
        seconds over the seconds a gradient of the same rows took. None without a
        gradient timing to compare with."""
        if not seconds_per_grad_row:
            return None
        return self.row_seconds / seconds_per_grad_row

    def _hvp(
        self, params: Params, batches: list[Batch], normaliser: float, vectors: Params, step: int | None
    ) -> Params:
        dp = self.fl.dp
        w = self.fl.router_weight(batches, normaliser)  # the whole step's N~ / M+, before the split
        local = dp.share(batches)
        total = self._product_sum(params, local, vectors, w) if local else None
        if total is None:  # a rank without a micro-batch still takes part in the reduction
            total = {n: torch.zeros_like(v) for n, v in vectors.items()}
        scale = step_scale(normaliser)
        return {n: t / scale for n, t in dp.sum(total).items()}

    def _product_sum(self, params: Params, batches: list[Batch], vectors: Params, router_weight: float = 0.0) -> Params:
        """Sum over ``batches`` (non-empty) of the unnormalised products with ``vectors`` (the
        Hessian of ``sum_b S_b + router_weight * A(B_b)``)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _product_sum nor _hvp")

    def _batched(self, fn: Callable[[Params], Params], vectors: Params) -> Params:
        """``vmap(fn)(vectors)``, or a loop over directions when vmap fails."""
        try:
            out = vmap(fn)(vectors)
            self.last_path = "vmap"
            return out
        except Exception as exc:  # noqa: BLE001 - any vmap failure falls back
            if not self._warned:
                log.warning("vmap over HVP directions failed (%s: %s); falling back to a loop",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self._warned = True
        k = next(iter(vectors.values())).shape[0]
        outs = [fn({n: v[i] for n, v in vectors.items()}) for i in range(k)]
        self.last_path = "loop"
        return {n: torch.stack([o[n] for o in outs]) for n in outs[0]}


def accumulate(total: Params | None, part: Params) -> Params:
    if total is None:
        return dict(part)
    return {n: total[n] + part[n] for n in total}


