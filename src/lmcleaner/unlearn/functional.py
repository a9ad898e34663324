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

Mixture of experts (``router``, a ``train.router.RouterAux``). With ``N`` the
supervised tokens of the step, ``N~ = max(N, 1)``, ``M+`` the micro-batches
holding a sample and ``S_b`` the NLL sum of micro-batch ``B_b``::

    L_t = (1/N~) sum_b l_b,    l_b = S_b + (N~ / M+) A(B_b)

(``micro_objective``; ``A`` is 0 for a micro-batch without samples, and with
no router ``l_b = S_b``). Gradients and exact/GGN curvature are sums over
micro-batches of ``l_b``'s, divided once by ``N~``. The counterfactual step
loss without a forget set ``Z`` recomputes ``N'``, ``M+'`` and each
``A(B_b \\ Z)`` over the rows left (``train.router`` docstring), so the
injection is, per micro-batch with kept rows ``K_b`` and removed rows ``R_b``::

    e = sum_b [ a grad S(K_b) - grad S(R_b) / N
                + grad A(K_b) / M+' - grad A(K_b + R_b) / M+ ]

with ``a = 1/N' - 1/N`` (``-1/N`` when nothing supervised is left) and the
``A(K_b)`` term absent for emptied micro-batches. ``A(K_b + R_b)`` is formed
from the router logits of the two row subsets evaluated separately (a token's
routing depends on its own row only), so each row still goes through one
forward and one backward.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

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


def to_compute(params: Params) -> Params:
    """Detached float32 copies (no copy when already float32)."""
    return {n: t.detach().to(COMPUTE_DTYPE) for n, t in params.items()}


class FunctionalLM:
    """A module seen as ``params -> step loss`` for a fixed set of trainable names.

    ``trainable`` are the names of the parameters the optimizer updates (the
    keys of ``ReplayedStep.params``); every other floating parameter or buffer
    is held fixed and, if not float32, upcast once. ``router``: the run's
    router term (``RouterAux.for_model(model, training_config)``; ``None`` for
    dense models), part of every loss, gradient and curvature below.
    """

    def __init__(self, model: nn.Module, trainable: Iterable[str], router: RouterAux | None = None) -> None:
        self.model = model
        self.router = router
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

    def micro_objective(self, params: Params, batch: Batch, scale: float, n_micro: int) -> torch.Tensor:
        """``l_b = S_b + (scale / M+) A(B_b)`` (module docstring); ``S_b`` alone without a router."""
        if self.router is None:
            return self.nll_sum(params, batch)
        logits, router_logits = self.forward(params, batch)
        nll = token_nll_sum(logits, batch["labels"])
        if n_micro <= 0 or not has_samples(batch):
            return nll
        return nll + (scale / n_micro) * self.router.loss(router_logits, batch)

    def loss(self, params: Params, batches: list[Batch], normaliser: float) -> torch.Tensor:
        """The step loss: summed token NLL over all micro-batches / one normaliser (+ the router term)."""
        scale, m = step_scale(normaliser), count_nonempty(batches)
        total = sum(self.micro_objective(params, b, scale, m) for b in batches)
        return total / scale

    def grad_nll_sum(self, params: Params, batches: list[Batch]) -> Params:
        """Gradient of the *unnormalised* NLL sum over ``batches`` (zeros if empty).

        Micro-batch by micro-batch so memory is that of one micro-batch.
        """
        out = {n: torch.zeros_like(p) for n, p in params.items()}
        for b in batches:
            g = torch.func.grad(self.nll_sum)(params, b)
            for n in out:
                out[n] += g[n]
        return out

    def grad(self, params: Params, batches: list[Batch], normaliser: float) -> Params:
        """Gradient of the step loss (zeros when nothing is supervised and there is no router term)."""
        if self.router is None:
            g = self.grad_nll_sum(params, batches)
            if normaliser <= 0:
                return g
            return {n: t / normaliser for n, t in g.items()}
        scale, m = step_scale(normaliser), count_nonempty(batches)
        out = {n: torch.zeros_like(p) for n, p in params.items()}
        for b in batches:
            g = torch.func.grad(self.micro_objective)(params, b, scale, m)
            for n in out:
                out[n] += g[n]
        return {n: t / scale for n, t in out.items()}

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
        ids = b["sample_ids"]
        drop = torch.tensor([int(i) in forget for i in ids.tolist()], dtype=torch.bool)
        rows = ids.shape[0]
        for mask, dest in ((~drop, kept), (drop, removed)):
            if mask.any():
                dest.append({k: (v[mask] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v)
                             for k, v in b.items()})
    return kept, removed


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


def _rows(b: Batch, mask: torch.Tensor) -> Batch | None:
    if not mask.any():
        return None
    rows = mask.shape[0]
    return {k: (v[mask] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v) for k, v in b.items()}


def _removal_injection_router(fl: FunctionalLM, params: Params, batches: list[Batch], forget: set[int],
                              normaliser: int) -> Params:
    """``removal_injection`` with the router term (module docstring), micro-batch by micro-batch."""
    router = fl.router
    pairs: list[tuple[Batch | None, Batch | None]] = []
    for b in batches:
        ids = b["sample_ids"]
        drop = torch.tensor([int(i) in forget for i in ids.tolist()], dtype=torch.bool)
        pairs.append((_rows(b, ~drop & (ids >= 0)), _rows(b, drop)))
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    if not any(r is not None for _, r in pairs):
        return out
    n, m = normaliser, count_nonempty(batches)
    n_keep = sum(count_supervised(k["labels"]) for k, _ in pairs if k is not None)
    m_keep = sum(1 for k, _ in pairs if k is not None)
    a = 0.0 if n <= 0 else ((1.0 / n_keep - 1.0 / n) if n_keep > 0 else -1.0 / n)
    untouched_aux = (1.0 / m_keep if m_keep else 0.0) - 1.0 / m  # 0 unless a micro-batch was emptied

    def objective(p: Params, kept: Batch | None, removed: Batch | None) -> torch.Tensor:
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

    for kept, removed in pairs:
        if kept is None and removed is None:
            continue
        if removed is None and a == 0.0 and not untouched_aux:
            continue
        g = torch.func.grad(objective)(params, kept, removed)
        for name in out:
            out[name] += g[name]
    return out


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
