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

The step loss is exactly the trainer's (``train.loss``):
``sum over micro-batches of token_nll_sum(logits, labels) / normaliser``.

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
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmcleaner.train.loss import count_supervised, token_nll_sum

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
    is held fixed and, if not float32, upcast once. ``dp``: the data-parallel
    split (default: :meth:`DataParallel.from_env`); :meth:`grad_nll_sum` and
    the HVP backends use it, :meth:`loss` and :meth:`nll_sum` are this
    process's local, differentiable functions.
    """

    def __init__(self, model: nn.Module, trainable: Iterable[str], dp: DataParallel | None = None) -> None:
        self.model = model
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
        # measured cost of gradients (seconds per row), the unit HVP costs are reported in
        self.grad_seconds = 0.0
        self.grad_rows = 0

    # -- forward -----------------------------------------------------------
    def logits(self, params: Params, batch: Batch) -> torch.Tensor:
        """float32 logits of one micro-batch at ``params``."""
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), **self._extra}
        out = functional_call(self.model, {**self.frozen, **params}, (), kwargs)
        return (out.logits if hasattr(out, "logits") else out).float()

    def nll_sum(self, params: Params, batch: Batch) -> torch.Tensor:
        return token_nll_sum(self.logits(params, batch), batch["labels"])

    def loss(self, params: Params, batches: list[Batch], normaliser: float) -> torch.Tensor:
        """The step loss: summed token NLL over all micro-batches / one normaliser (in this
        process, differentiable; no data-parallel split)."""
        total = sum(self.nll_sum(params, b) for b in batches)
        return total / normaliser

    def grad_nll_sum(self, params: Params, batches: list[Batch]) -> Params:
        """Gradient of the *unnormalised* NLL sum over ``batches`` (zeros if empty).

        Micro-batch by micro-batch so memory is that of one micro-batch; under
        several processes each rank differentiates its share and the sums are
        all-reduced (``dp``).
        """
        t0 = time.perf_counter()
        out = {n: torch.zeros_like(p) for n, p in params.items()}
        for b in self.dp.share(batches):
            g = torch.func.grad(self.nll_sum)(params, b)
            for n in out:
                out[n] += g[n]
            self.grad_rows += int(b["input_ids"].shape[0])
        self.grad_seconds += time.perf_counter() - t0
        return self.dp.sum(out)

    @property
    def seconds_per_row(self) -> float | None:
        """Measured seconds of a gradient per batch row in this process (None before any)."""
        return self.grad_seconds / self.grad_rows if self.grad_rows else None

    def grad(self, params: Params, batches: list[Batch], normaliser: float) -> Params:
        """Gradient of the step loss (zeros when nothing is supervised)."""
        g = self.grad_nll_sum(params, batches)
        if normaliser <= 0:
            return g
        return {n: t / normaliser for n, t in g.items()}

    @contextlib.contextmanager
    def curvature_mode(self) -> Iterator[None]:
        """Deterministic, twice-differentiable forward for the duration of a sweep.

        - eval mode: curvature of the deterministic loss (dropout ignored;
          tiny Llama/Qwen configs have none).
        - SDPA forced to the composite "math" kernel: the CPU flash kernel
          implements neither forward-mode AD nor double backward (measured).
        - attention implementations other than eager/sdpa (flash-attention,
          flex) are switched to ``eager`` and restored afterwards.
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
        model.eval()
        try:
            with sdpa_kernel([SDPBackend.MATH]):
                yield
        finally:
            if switched:
                model.set_attn_implementation(impl)
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
        ids = b["sample_ids"]
        drop = torch.tensor([int(i) in forget for i in ids.tolist()], dtype=torch.bool)
        rows = ids.shape[0]
        for mask, dest in ((~drop, kept), (drop, removed)):
            if mask.any():
                dest.append({k: (v[mask] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v)
                             for k, v in b.items()})
    return kept, removed


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
    kept, removed = split_rows(batches, forget)
    if not removed or normaliser <= 0:
        return {n: torch.zeros_like(p) for n, p in params.items()}
    n_keep = supervised(kept)
    g_keep = fl.grad_nll_sum(params, kept)
    g_drop = fl.grad_nll_sum(params, removed)
    a = (1.0 / n_keep - 1.0 / normaliser) if n_keep > 0 else -1.0 / normaliser
    return {n: a * g_keep[n] - g_drop[n] / normaliser for n in params}


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
