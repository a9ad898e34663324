"""Curvature-vector products of a step loss at recorded parameters.

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

Micro-batches are processed one at a time (``H = sum_b H_b / N``) so memory
is that of one micro-batch, whatever the accumulation.

Measured cost (``tests/unlearn/bench_hvp.py``, torch 2.13 CPU, shared 2-core
machine, 2-layer Llama hidden 64, 147,776 params, one micro-batch of 4 rows
x 32 tokens, SDPA math kernel, min over interleaved rounds, two runs, 1 and 2
threads), in gradient evaluations per direction:

    backend                            k = 1        k = 8
    exact, double backward (default)   2.0 - 2.1    0.59 - 0.80
    exact, rev-over-rev (torch.func)   2.2 - 2.3    0.66 - 0.93
    exact, fwd-over-rev                3.7 - 4.0    0.95 - 1.31
    GGN                                2.5 - 2.8    0.50 - 0.62

so double backward (``create_graph`` then one batched backward for the k
directions) is the default exact implementation; batching k directions
costs far less than k separate products. ``HVP_COST_IN_GRADS`` holds the
k = 1 figures, used to report gradient-equivalents conservatively.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Union

import torch
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmcleaner.train.loss import IGNORE_INDEX, shift_labels
from lmcleaner.unlearn.functional import Batch, FunctionalLM, Params

log = logging.getLogger(__name__)

HESSIAN_MODES = ("exact", "GGN", "diag")
EXACT_IMPLS = ("double_backward", "rev_rev", "fwd_rev")
# measured, see the module docstring (gradient evaluations per HVP direction, k = 1)
HVP_COST_IN_GRADS = {"exact": 2.0, "exact/rev_rev": 2.2, "exact/fwd_rev": 3.8, "GGN": 2.7, "diag": 0.0}

DiagProvider = Union[Callable[[int], Params], Mapping[int, Params]]


class HVPBackend(ABC):
    """Curvature of the step loss times a batch of directions (see module doc)."""

    name: str = ""

    def __init__(self) -> None:
        self.calls = 0  # batched calls
        self.vectors = 0  # directions multiplied
        self.last_path: str | None = None
        self._warned = False

    @property
    def cost_in_grads(self) -> float:
        return HVP_COST_IN_GRADS[self.name]

    def hvp(
        self, params: Params, batches: list[Batch], normaliser: float, vectors: Params, *, step: int | None = None
    ) -> Params:
        k = next(iter(vectors.values())).shape[0]
        self.calls += 1
        self.vectors += k
        if normaliser <= 0:  # nothing supervised: the step loss is identically 0
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


def _accumulate(total: Params | None, part: Params) -> Params:
    if total is None:
        return dict(part)
    return {n: total[n] + part[n] for n in total}


class ExactHVP(HVPBackend):
    """Exact Hessian-vector products.

    ``impl="double_backward"`` (default, fastest measured): reverse over
    reverse with ``torch.autograd.grad(create_graph=True)``: one forward +
    backward builds the gradient graph, then one batched backward
    (``is_grads_batched``, i.e. vmap) through it for the k directions
    (``H`` symmetric, so ``v^T H = (H v)^T``).
    ``impl="rev_rev"``: the same with ``torch.func`` (``vjp`` of ``grad``).
    ``impl="fwd_rev"``: ``jvp`` of ``grad`` (forward-over-reverse).
    All need a twice-differentiable attention kernel, which
    ``FunctionalLM.curvature_mode`` arranges.
    """

    name = "exact"

    def __init__(self, fl: FunctionalLM, impl: str = "double_backward") -> None:
        super().__init__()
        if impl not in EXACT_IMPLS:
            raise ValueError(f"unknown exact HVP impl {impl!r}; use one of {EXACT_IMPLS}")
        self.fl, self.impl = fl, impl

    @property
    def cost_in_grads(self) -> float:
        return HVP_COST_IN_GRADS["exact" if self.impl == "double_backward" else f"exact/{self.impl}"]

    def _hvp(self, params, batches, normaliser, vectors, step):
        total: Params | None = None
        for b in batches:
            def g(p: Params, b: Batch = b) -> Params:
                return grad(self.fl.nll_sum)(p, b)

            if self.impl == "rev_rev":
                _, pullback = vjp(g, params)
                part = self._batched(lambda v: pullback(v)[0], vectors)
            elif self.impl == "double_backward":
                part = self._double_backward(params, b, vectors)
            else:
                part = self._batched(lambda v: jvp(g, (params,), (v,))[1], vectors)
            total = _accumulate(total, part)
        return {n: t / normaliser for n, t in total.items()}

    def _double_backward(self, params: Params, batch: Batch, vectors: Params) -> Params:
        names = list(params)
        leaves = [params[n].detach().requires_grad_() for n in names]
        with torch.enable_grad():
            loss = self.fl.nll_sum(dict(zip(names, leaves)), batch)
            g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        pairs = [(gi, leaf, n) for gi, leaf, n in zip(g, leaves, names) if gi is not None and gi.requires_grad]
        out = {n: torch.zeros_like(vectors[n]) for n in names}
        if not pairs:
            return out
        outs, ins, vs = [p[0] for p in pairs], leaves, [vectors[p[2]] for p in pairs]
        try:
            res = torch.autograd.grad(outs, ins, grad_outputs=vs, is_grads_batched=True, allow_unused=True,
                                      retain_graph=True)
            self.last_path = "vmap"
        except Exception as exc:  # noqa: BLE001
            if not self._warned:
                log.warning("batched double backward failed (%s); falling back to a loop", type(exc).__name__)
                self._warned = True
            k = vs[0].shape[0]
            per = [torch.autograd.grad(outs, ins, grad_outputs=[v[i] for v in vs], allow_unused=True,
                                       retain_graph=True) for i in range(k)]
            res = [None if per[0][j] is None else torch.stack([r[j] for r in per]) for j in range(len(ins))]
            self.last_path = "loop"
        for n, r in zip(names, res):
            if r is not None:
                out[n] = r.detach()
        return out


class GGNHVP(HVPBackend):
    """Generalised Gauss-Newton products ``J^T H_out J v / N``.

    ``J`` is the Jacobian of the float32 logits w.r.t. the trainable
    parameters and ``H_out = diag(p) - p p^T`` the Hessian of softmax
    cross-entropy w.r.t. the logits at each *supervised* (shifted) position;
    unsupervised positions contribute nothing. Computed as jvp of the logits,
    multiplication by ``H_out``, vjp back: never forms ``J``. Positive
    semi-definite, unlike the exact Hessian.
    """

    name = "GGN"

    def __init__(self, fl: FunctionalLM) -> None:
        super().__init__()
        self.fl = fl

    def _hvp(self, params, batches, normaliser, vectors, step):
        total: Params | None = None
        for b in batches:
            def f(p: Params, b: Batch = b) -> torch.Tensor:
                return self.fl.logits(p, b)

            z, pullback = vjp(f, params)
            prob = z.detach().softmax(-1)
            mask = (shift_labels(b["labels"]) != IGNORE_INDEX).unsqueeze(-1).to(prob.dtype)

            def one(v: Params) -> Params:
                jv = jvp(f, (params,), (v,))[1]
                u = prob * jv - prob * (prob * jv).sum(-1, keepdim=True)
                return pullback(u * mask)[0]

            total = _accumulate(total, self._batched(one, vectors))
        return {n: t / normaliser for n, t in total.items()}


class DiagHVP(HVPBackend):
    """Elementwise product with a supplied per-step diagonal of the step-loss Hessian.

    ``provider`` maps a step index to ``{name: diagonal}`` (a mapping or a
    callable), e.g. the recorder's diag mode; the diagonal is that of ``H_t``
    of the normalised step loss, so ``normaliser`` is not applied again.
    """

    name = "diag"

    def __init__(self, provider: DiagProvider) -> None:
        super().__init__()
        self.provider = provider

    def diagonal(self, step: int | None) -> Params:
        if step is None:
            raise ValueError("diag HVP needs the step index; call hvp(..., step=t)")
        try:
            d = self.provider[step] if isinstance(self.provider, Mapping) else self.provider(step)
        except KeyError:
            d = None
        if d is None:
            raise ValueError(f"no diagonal curvature for step {step}; record with compute_diag_h=true")
        return d

    def _hvp(self, params, batches, normaliser, vectors, step):
        diag = self.diagonal(step)
        missing = [n for n in vectors if n not in diag]
        if missing:
            raise ValueError(f"diagonal for step {step} lacks parameters {missing[:3]}")
        self.last_path = "vmap"
        return {n: v * diag[n].to(v.dtype) for n, v in vectors.items()}


def make_hvp_backend(
    mode: str, fl: FunctionalLM, diag_provider: DiagProvider | None = None, exact_impl: str = "double_backward"
) -> HVPBackend:
    """Backend for ``hessian_mode``; one-line ValueError for bad input."""
    if mode == "exact":
        return ExactHVP(fl, exact_impl)
    if mode == "GGN":
        return GGNHVP(fl)
    if mode == "diag":
        if diag_provider is None:
            raise ValueError("hessian_mode='diag' needs diag_provider (per-step diagonals); "
                             "record with compute_diag_h=true or use hessian_mode='exact' or 'GGN'")
        return DiagHVP(diag_provider)
    raise ValueError(f"unknown hessian_mode {mode!r}; use one of {HESSIAN_MODES}")
