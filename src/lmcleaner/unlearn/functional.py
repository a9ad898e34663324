"""Functional view of a causal LM: the step loss as a pure function of the
trainable parameters, evaluated in float32.

Why functional: the unlearning engine evaluates gradients and curvature at
*recorded past* parameters ``theta_t`` (DESIGN §2: Hessians at the current
weights made corrections 5x worse). ``torch.func.functional_call`` lets us
plug ``theta_t`` into the live module without touching its weights; only the
trainable parameters are overridden, frozen ones (a LoRA base) stay in the
module.

Why float32: in bf16, ``eta * H v`` is below the bf16 resolution of the
weights and vanishes (DESIGN trap). All curvature and propagation arithmetic
therefore runs in float32 even for a bf16 model; frozen bf16 weights are
upcast once (a float32 copy; no copy when the model is already float32).

The step loss is exactly the trainer's (``train.loss``, ``train.router``):
``sum over micro-batches of token_nll_sum(logits, labels) / normaliser``, plus,
for a mixture of experts trained with router losses, the mean over the step's
non-empty micro-batches of their router auxiliary loss ``A(B)``.

Data parallel (``torchrun``): every quantity the unlearning engine evaluates
on a step is a *sum over micro-batches* (NLL sums, their gradients, their
Hessian-vector products) divided by one normaliser. So under several
processes each rank evaluates its share of the micro-batches (``rank, rank +
W, ...``, the trainer's own split), the partial sums are all-reduced, and the
normaliser is applied after the reduction: the same numbers as one process up
to the order of the float summation (bit for bit when every rank holds one
micro-batch, since ``a + b == b + a``). :class:`DataParallel` is that split
and reduction, used here and by the HVP backends (``unlearn.hvp.base``) and
nowhere else; it is picked up from ``torch.distributed`` when a process group
with more than one rank is initialised, so every rank must run the same
unlearning call (``torchrun ... lmcleaner unlearn``, or an online request,
which all ranks apply at the same step).

Mixture of experts (``router``, a ``train.router.RouterAux``). With ``N`` the
supervised tokens of the step, ``N~ = max(N, 1)``, ``M+`` the micro-batches
holding a sample (both counted over the whole step: every accumulation step
of every rank) and ``S_b`` the NLL sum of micro-batch ``B_b``::

    L_t = (1/N~) sum_b l_b,    l_b = S_b + w A(B_b),    w = N~ / M+

(``micro_objective``, ``router_weight``; ``A`` is 0 for a micro-batch without
samples, and with no router ``w = 0``, ``l_b = S_b``). The router term thus
fits the data-parallel structure unchanged: gradients and exact/GGN curvature
are sums over micro-batches of ``l_b``'s, all-reduced, then divided once by
``N~``. The one thing to get right is that ``w`` belongs to the *step*: it is
computed from all of the step's micro-batches before the split and passed to
each rank's micro-batch objectives (a rank's share has its own, different
``M+``). Dividing after the reduction then gives
``(1/N~) sum_ranks sum_{b in share} (S_b + w A_b) = L_t``'s derivatives.

The counterfactual step loss without a forget set ``Z`` recomputes ``N'``,
``M+'`` and each ``A(B_b \\ Z)`` over the rows left (``train.router``
docstring), so the injection is, per micro-batch with kept rows ``K_b`` and
removed rows ``R_b``::

    e = sum_b [ a grad S(K_b) - grad S(R_b) / N
                + grad A(K_b) / M+' - grad A(K_b + R_b) / M+ ]

with ``a = 1/N' - 1/N`` (``-1/N`` when nothing supervised is left) and the
``A(K_b)`` term absent for emptied micro-batches. Every term belongs to one
micro-batch, so it is split and all-reduced like a gradient (``N``, ``N'``,
``M+``, ``M+'`` counted over the whole step first). ``A(K_b + R_b)`` is
formed from the router logits of the two row subsets evaluated separately (a
token's routing depends on its own row only), so each row still goes through
one forward and one backward. The curvature of the remaining rows ``H^{-Z}``
(``propagation.propagate``'s ``counterfactual_batches``: the kept micro-batches
and ``N'``) is the Hessian of the same ``L^{-Z}``: the same rule gives it
``w' = max(N', 1) / M+'``, ``M+'`` being the kept micro-batches that still
hold a sample.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmcleaner.train.loss import count_supervised, token_nll_sum
from lmcleaner.train.router import (
    RouterAux,
    count_nonempty,
    has_samples,
    real_token_mask,
)

Params = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]

COMPUTE_DTYPE = torch.float32
log = logging.getLogger(__name__)

# Attention implementations whose kernels support forward-mode AD and double
# backward once the SDPA "math" kernel is forced (measured: the CPU flash SDPA
# kernel supports neither).
_DIFFERENTIABLE_ATTN = ("eager", "sdpa")


class DataParallel:
    """This process's share of a step's micro-batches and the sum over processes.

    ``DataParallel()`` is one process (no split, no communication);
    :meth:`from_env` uses the default ``torch.distributed`` group when one with
    more than one rank is initialised. Every rank must call :meth:`sum` in the
    same order (they do: the unlearning sweep is deterministic).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group=None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size, self.group = rank, world_size, group

    @classmethod
    def from_env(cls) -> "DataParallel":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, batches: list[Batch]) -> list[Batch]:
        """The micro-batches this rank evaluates (the trainer's ``rank::world_size`` split)."""
        return batches[self.rank::self.world_size] if self.active else batches

    def sum(self, parts: Params) -> Params:
        """All-reduced sum of per-rank partial sums (one flat buffer, one collective)."""
        if not self.active:
            return parts
        import torch.distributed as dist

        names = list(parts)
        flat = torch.cat([parts[n].reshape(-1) for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        out, k = {}, 0
        for n in names:
            size = parts[n].numel()
            out[n] = flat[k:k + size].view_as(parts[n])
            k += size
        return out


def to_compute(params: Params) -> Params:
    """Detached float32 copies (no copy when already float32)."""
    return {n: t.detach().to(COMPUTE_DTYPE) for n, t in params.items()}


class FunctionalLM:
    """A module seen as ``params -> step loss`` for a fixed set of trainable names.

    ``trainable`` are the names of the parameters the optimizer updates (the
    keys of ``ReplayedStep.params``); every other floating parameter or buffer
    is held fixed and, if not float32, upcast once. ``router``: the run's
    router term (``RouterAux.for_model(model, training_config)``; ``None`` for
    dense models), part of every loss, gradient and curvature below. ``dp``:
    the data-parallel split (default: :meth:`DataParallel.from_env`);
    :meth:`grad_nll_sum`, :meth:`grad`, the injections and the HVP backends
    use it, :meth:`loss`, :meth:`nll_sum` and :meth:`micro_objective` are this
    process's local, differentiable functions.
    """

    def __init__(self, model: nn.Module, trainable: Iterable[str], router: RouterAux | None = None,
                 dp: DataParallel | None = None) -> None:
        self.model = model
        self.router = router
        self.dp = dp if dp is not None else DataParallel.from_env()
        self.trainable = list(trainable)
        known = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        missing = [n for n in self.trainable if n not in known]
        if missing:
            raise ValueError(
                f"trainable parameter names not found in the model: {missing[:3]}; "
                "pass the same module (same wrapping, e.g. PEFT) that the trainer recorded"
            )
        names = set(self.trainable)
        self.frozen: Params = {}
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if n not in names and t.is_floating_point() and t.dtype != COMPUTE_DTYPE:
                self.frozen[n] = t.detach().to(COMPUTE_DTYPE)
        config = getattr(model, "config", None)
        self._extra = {"use_cache": False} if hasattr(config, "use_cache") else {}
        # batches are collated on the CPU; the model may live on an accelerator
        self.device = next(iter(model.parameters())).device
        # measured cost of gradients (seconds per row), the unit HVP costs are reported in
        self.grad_seconds = 0.0
        self.grad_rows = 0

    # -- forward -----------------------------------------------------------
    def forward(self, params: Params, batch: Batch) -> tuple[torch.Tensor, tuple | None]:
        """(float32 logits, router logits per layer or ``None``) of one micro-batch at ``params``."""
        mask = batch.get("attention_mask")
        kwargs = {"input_ids": batch["input_ids"].to(self.device),
                  "attention_mask": mask.to(self.device) if mask is not None else None, **self._extra}
        if self.router is not None:
            kwargs["output_router_logits"] = True
        out = functional_call(self.model, {**self.frozen, **params}, (), kwargs)
        logits = (out.logits if hasattr(out, "logits") else out).float()
        router_logits = getattr(out, "router_logits", None) if self.router is not None else None
        if self.router is not None and router_logits is None:
            raise ValueError("the model returned no router logits although the run trained with router losses")
        return logits, (tuple(router_logits) if router_logits is not None else None)

    def logits(self, params: Params, batch: Batch) -> torch.Tensor:
        """float32 logits of one micro-batch at ``params``."""
        return self.forward(params, batch)[0]

    def nll_sum(self, params: Params, batch: Batch) -> torch.Tensor:
        return token_nll_sum(self.logits(params, batch), batch["labels"])

    def micro_objective(self, params: Params, batch: Batch, router_weight: float = 0.0) -> torch.Tensor:
        """``l_b = S_b + w A(B_b)`` (module docstring; ``w``: :meth:`router_weight` of the whole
        step); ``S_b`` alone without a router, with ``w = 0`` or for a micro-batch without samples."""
        if self.router is None or router_weight == 0.0 or not has_samples(batch):
            return self.nll_sum(params, batch)
        logits, router_logits = self.forward(params, batch)
        return token_nll_sum(logits, batch["labels"]) + router_weight * self.router.loss(router_logits, batch)

    def router_weight(self, batches: list[Batch], normaliser: float) -> float:
        """``w = N~ / M+`` of a step from *all* its micro-batches (0 without a router or a sample)."""
        if self.router is None:
            return 0.0
        m = count_nonempty(batches)
        return step_scale(normaliser) / m if m else 0.0

    def loss(self, params: Params, batches: list[Batch], normaliser: float) -> torch.Tensor:
        """The step loss: summed micro-batch objectives (token NLL, + the router term) / one
        normaliser (in this process, differentiable; no data-parallel split)."""
        w = self.router_weight(batches, normaliser)
        total = sum(self.micro_objective(params, b, w) for b in batches)
        return total / step_scale(normaliser)

    def grad_nll_sum(self, params: Params, batches: list[Batch], router_weight: float = 0.0) -> Params:
        """Gradient of the *unnormalised* sum over ``batches`` of the micro-batch objectives
        (zeros if empty): the NLL sums, plus ``router_weight * A(B_b)`` when a router term is
        given (``w`` of the whole step, :meth:`router_weight`).

        Micro-batch by micro-batch so memory is that of one micro-batch; under
        several processes each rank differentiates its share and the sums are
        all-reduced (``dp``).
        """
        return self.reduced_grad(params, batches, lambda p, b: self.micro_objective(p, b, router_weight),
                                 lambda b: int(b["input_ids"].shape[0]))

    def reduced_grad(self, params: Params, items: list, objective: Callable[[Params, Any], torch.Tensor],
                     rows: Callable[[Any], int]) -> Params:
        """``sum over items of grad objective(params, item)``: each rank differentiates its share
        of ``items`` (one micro-batch's worth each), the sums are all-reduced. Timed, with
        ``rows(item)`` batch rows, as the measured cost of a gradient."""
        t0 = time.perf_counter()
        out = {n: torch.zeros_like(p) for n, p in params.items()}
        for item in self.dp.share(items):
            g = torch.func.grad(objective)(params, item)
            for n in out:
                out[n] += g[n]
            self.grad_rows += rows(item)
        self.grad_seconds += time.perf_counter() - t0
        return self.dp.sum(out)

    @property
    def seconds_per_row(self) -> float | None:
        """Measured seconds of a gradient per batch row in this process (None before any)."""
        return self.grad_seconds / self.grad_rows if self.grad_rows else None

    def grad(self, params: Params, batches: list[Batch], normaliser: float) -> Params:
        """Gradient of the step loss (zeros when nothing is supervised and there is no router term)."""
        g = self.grad_nll_sum(params, batches, self.router_weight(batches, normaliser))
        return {n: t / step_scale(normaliser) for n, t in g.items()}

    @contextlib.contextmanager
    def curvature_mode(self) -> Iterator[None]:
        """Deterministic, twice-differentiable forward for the duration of a sweep.

        - eval mode: curvature of the deterministic loss (dropout ignored;
          tiny Llama/Qwen configs have none).
        - SDPA forced to the composite "math" kernel: the CPU flash kernel
          implements neither forward-mode AD nor double backward (measured).
        - attention implementations other than eager/sdpa (flash-attention,
          flex) are switched to ``eager`` and restored afterwards.
        - mixture-of-experts layers run their ``eager`` experts loop (the
          grouped-matmul kernel has no forward-mode AD, measured with torch
          2.13), restored afterwards.
        """
        model = self.model
        was_training = model.training
        config = getattr(model, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        switched = False
        if impl is not None and impl not in _DIFFERENTIABLE_ATTN:
            if not hasattr(model, "set_attn_implementation"):
                raise ValueError(
                    f"attention implementation {impl!r} is not twice differentiable; "
                    "load the model with attn_implementation='eager' or 'sdpa'"
                )
            log.info("switching attention %r -> 'eager' for curvature", impl)
            model.set_attn_implementation("eager")
            switched = True
        experts = getattr(config, "_experts_implementation", None)
        switch_experts = experts not in (None, "eager") and hasattr(model, "set_experts_implementation")
        if switch_experts:
            model.set_experts_implementation("eager")
        model.eval()
        try:
            with sdpa_kernel([SDPBackend.MATH]):
                yield
        finally:
            if switched:
                model.set_attn_implementation(impl)
            if switch_experts:
                model.set_experts_implementation(experts)
            model.train(was_training)


# -- counterfactual rows ------------------------------------------------------
def split_rows(batches: list[Batch], forget: set[int]) -> tuple[list[Batch], list[Batch]]:
    """Split every micro-batch into (kept rows, removed rows); empty parts dropped.

    Every tensor whose first dimension is the row count is indexed, so extra
    collated fields (position_ids, ...) follow their rows.
    """
    kept: list[Batch] = []
    removed: list[Batch] = []
    for b in batches:
        drop = _dropped(b, forget)
        for part, dest in ((_rows(b, ~drop), kept), (_rows(b, drop), removed)):
            if part is not None:
                dest.append(part)
    return kept, removed


def _dropped(b: Batch, forget: set[int]) -> torch.Tensor:
    """``[rows]`` bool: the rows of ``b`` whose sample is in ``forget``."""
    return torch.tensor([int(i) in forget for i in b["sample_ids"].tolist()], dtype=torch.bool)


def _rows(b: Batch, mask: torch.Tensor) -> Batch | None:
    """The rows of ``b`` selected by ``mask`` (``None`` when none is)."""
    if not mask.any():
        return None
    rows = mask.shape[0]
    return {k: (v[mask] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v) for k, v in b.items()}


def step_scale(normaliser: float) -> float:
    """``N~ = max(N, 1)``: the one division of the step loss (``S_b`` is 0 when ``N`` is)."""
    return float(normaliser) if normaliser > 0 else 1.0


def supervised(batches: list[Batch]) -> int:
    """Supervised tokens over micro-batches (the normaliser of their step loss)."""
    return sum(count_supervised(b["labels"]) for b in batches)


def removal_injection(
    fl: FunctionalLM, params: Params, batches: list[Batch], forget: set[int], normaliser: int
) -> Params:
    """``e_t = grad L_t^{-Z}(theta_t) - grad L_t(theta_t)`` for the forget set ``Z``.

    ``L^{-Z}`` is the step loss over the remaining rows with the normaliser
    recomputed over their supervised tokens (``N'``). With ``S_keep`` and
    ``S_drop`` the NLL sums of the kept and removed rows,
    ``e = (1/N' - 1/N) grad S_keep - grad S_drop / N`` (``1/N'`` term absent when
    nothing remains): the same quantity as two full gradient evaluations, for
    the cost of one, since each row is differentiated once.
    """
    if fl.router is not None:
        return _removal_injection_router(fl, params, batches, forget, normaliser)
    kept, removed = split_rows(batches, forget)
    if not removed or normaliser <= 0:
        return {n: torch.zeros_like(p) for n, p in params.items()}
    n_keep = supervised(kept)
    g_keep = fl.grad_nll_sum(params, kept)
    g_drop = fl.grad_nll_sum(params, removed)
    a = (1.0 / n_keep - 1.0 / normaliser) if n_keep > 0 else -1.0 / normaliser
    return {n: a * g_keep[n] - g_drop[n] / normaliser for n in params}


def _removal_injection_router(fl: FunctionalLM, params: Params, batches: list[Batch], forget: set[int],
                              normaliser: int) -> Params:
    """``removal_injection`` with the router term (module docstring), micro-batch by micro-batch:
    the step's counts first (all micro-batches), then each rank differentiates its share of the
    micro-batches that contribute and the sums are all-reduced (``fl.reduced_grad``)."""
    router = fl.router
    pairs: list[tuple[Batch | None, Batch | None]] = []
    for b in batches:
        drop = _dropped(b, forget)
        pairs.append((_rows(b, ~drop & (b["sample_ids"] >= 0)), _rows(b, drop)))
    if not any(r is not None for _, r in pairs):
        return {n: torch.zeros_like(p) for n, p in params.items()}
    n, m = normaliser, count_nonempty(batches)
    n_keep = sum(count_supervised(k["labels"]) for k, _ in pairs if k is not None)
    m_keep = sum(1 for k, _ in pairs if k is not None)
    a = 0.0 if n <= 0 else ((1.0 / n_keep - 1.0 / n) if n_keep > 0 else -1.0 / n)
    untouched_aux = (1.0 / m_keep if m_keep else 0.0) - 1.0 / m  # 0 unless a micro-batch was emptied

    def objective(p: Params, pair: tuple[Batch | None, Batch | None]) -> torch.Tensor:
        kept, removed = pair
        total = torch.zeros(())
        parts = []
        if kept is not None:
            logits, rl = fl.forward(p, kept)
            total = total + a * token_nll_sum(logits, kept["labels"])
            parts.append((rl, real_token_mask(kept)))
        if removed is None:
            return total + untouched_aux * router.loss(parts[0][0], kept) if untouched_aux else total
        logits, rl = fl.forward(p, removed)
        if n > 0:
            total = total - token_nll_sum(logits, removed["labels"]) / n
        parts.append((rl, real_token_mask(removed)))
        if kept is not None:
            total = total + router.loss(parts[0][0], kept) / m_keep
        return total - router.loss_of_parts(parts) / m

    # a micro-batch contributes when it lost rows, or (kept whole) when a or M+ changed
    work = [(k, r) for k, r in pairs if r is not None or (k is not None and (a != 0.0 or untouched_aux))]
    return fl.reduced_grad(params, work, objective,
                           lambda pair: sum(int(x["input_ids"].shape[0]) for x in pair if x is not None))


def check_normaliser(batches: list[Batch], normaliser: int, step: int) -> None:
    """The recorded normaliser must be the supervised-token count of the batches.

    Otherwise the loss we linearise is not the one that was trained (e.g. the
    replay yielded only one rank's micro-batches).
    """
    n = supervised(batches)
    if n != normaliser:
        raise ValueError(
            f"step {step}: batches hold {n} supervised tokens but the record says normaliser={normaliser}; "
            "replay must yield all micro-batches of the step (all ranks)"
        )


def norm(params: Params) -> float:
    return float(torch.sqrt(sum((t.float() ** 2).sum() for t in params.values())))
