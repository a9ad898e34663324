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
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmcleaner.unlearn.functional import Batch, FunctionalLM, Params

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

    def __init__(self) -> None:
        self.calls = 0  # batched calls
        self.vectors = 0  # directions multiplied
        self.last_path: str | None = None
        self._warned = False

    #: measured cost of one direction in gradient evaluations (k = 1), see ``exact.py``
    cost_in_grads: float = 0.0

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
        fl = getattr(self, "fl", None)
        if normaliser <= 0 and getattr(fl, "router", None) is None:  # nothing supervised: the step loss is 0
            return {n: torch.zeros_like(v) for n, v in vectors.items()}
        # the CPU flash SDPA kernel supports neither forward-mode AD nor double backward
        with sdpa_kernel([SDPBackend.MATH]):
            return self._hvp(params, batches, normaliser, vectors, step)

    @abstractmethod
    def _hvp(
        self, params: Params, batches: list[Batch], normaliser: float, vectors: Params, step: int | None
    ) -> Params: ...

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


