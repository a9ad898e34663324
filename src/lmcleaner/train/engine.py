"""One optimizer step, shared by training, resume, replay and exact unlearning.

Everything that decides the numbers of a step lives here, so a replay or a
counterfactual run goes through exactly the code that trained the model:

- the step's batch is given as sample ids (micro-step major, rank minor);
  ids in ``excluded`` are dropped and the loss normaliser is recomputed over
  the remaining supervised tokens (DESIGN §3);
- the step loss is ``sum NLL / N`` with one ``N`` for the whole step, so
  accumulation and multi-process averaging are exact; a mixture of experts
  adds the mean over the step's non-empty micro-batches of their router
  auxiliary loss (``router.py`` defines both and the counterfactual);
- the dropout RNG is re-seeded from ``(seed, step, rank)`` so a step can be
  redone alone and removing a sample does not shift later steps' randomness;
- the applied learning rates are read before ``optimizer.step()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..data.collate import Collator
from ..trajectory.types import StepRecord
from . import distributed
from .loss import token_nll_sum
from .router import RouterAux, has_samples


class StepObserver(Protocol):
    """Hooks the trainer calls around a step. See :class:`NullObserver`."""

    def on_step_begin(self, engine: "Engine", step: int, micro_batches: list[list[int]]) -> None: ...
    def on_after_backward(self, engine: "Engine", step: int) -> None: ...
    def on_step_end(self, engine: "Engine", record: StepRecord, batches: list[dict]) -> None: ...


class NullObserver:
    """Does nothing, so the loop never branches on whether anyone listens."""

    def on_step_begin(self, engine, step, micro_batches):
        pass

    def on_after_backward(self, engine, step):
        pass

    def on_step_end(self, engine, record, batches):
        pass


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


@dataclass
class Engine:
    """The objects a step needs. ``model``/``optimizer`` may be Accelerate-wrapped."""

    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    dataset: Any
    collator: Collator
    training: Any  # TrainingConfig
    seed: int
    sup_counts: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.sup_counts:
            self.sup_counts = [self.dataset.supervised_tokens(i) for i in range(len(self.dataset))]

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The live trainable parameters (``DTensor`` shards under FSDP)."""
        return {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    def full_trainable(self) -> dict[str, torch.Tensor]:
        """Detached full copies of the trainable parameters (a collective under FSDP)."""
        return distributed.gather(self.trainable())

    @property
    def router_aux(self) -> RouterAux | None:
        """The router term of the step loss (``None`` for dense models or when switched off)."""
        return RouterAux.for_model(self.unwrapped, self.training)

    def applied_lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]


def _filter(micro_batches: list[list[int]], excluded: set[int]) -> list[list[int]]:
    if not excluded:
        return [list(mb) for mb in micro_batches]
    return [[i for i in mb if i not in excluded] for mb in micro_batches]


def micro_batch_loss(model, batch: dict, device, normaliser: int, world_size: int, n_micro: int,
                     router: RouterAux | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, NLL sum) of one micro-batch: ``NLL * world_size / N`` (+ router term).

    ``N`` is the whole step's supervised-token count and ``n_micro`` its
    micro-batches holding a sample (``M+``, all ranks). ``router``: the run's
    router term (``Engine.router_aux``; a mixture of experts trained with
    router losses), else None; a micro-batch holding a sample then adds
    ``A(B) * world_size / M+``, so the step's term is the mean of ``A`` over
    its non-empty micro-batches (``router.py``). Shared with
    :mod:`lmcleaner.integrations` so a recorded Hugging Face ``Trainer`` step
    computes exactly what a replayed step computes.
    """
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if router is not None:
        inputs["output_router_logits"] = True
    out = model(**inputs, use_cache=False)
    nll = token_nll_sum(out.logits, batch["labels"].to(device))
    # DDP averages over ranks; multiplying by the world size turns that into a sum.
    loss = nll * (world_size / normaliser) if normaliser > 0 else nll * 0.0
    if router is not None and n_micro > 0 and has_samples(batch) and getattr(out, "router_logits", None) is not None:
        # DDP averages over ranks: world_size / M+ per micro-batch makes the step's term sum_b A_b / M+
        loss = loss + router.loss(out.router_logits, batch) * (world_size / n_micro)
    return loss, nll


def run_step(engine: Engine, step: int, epoch: int, micro_batches: list[list[int]],
             excluded: set[int] | frozenset = frozenset(), observer: StepObserver = NullObserver()) -> StepRecord:
    """Run optimizer step ``step`` on the given global micro-batches."""
    acc, t = engine.accelerator, engine.training
    kept = _filter(micro_batches, set(excluded))
    dropped = sorted({i for mb in micro_batches for i in mb} - {i for mb in kept for i in mb})
    normaliser = sum(engine.sup_counts[i] for mb in kept for i in mb)
    ws, rank = engine.world_size, engine.rank
    mine = kept[rank::ws]
    seed = step_seed(engine.seed, step, 0)
    torch.manual_seed(step_seed(engine.seed, step, rank))
    observer.on_step_begin(engine, step, micro_batches)

    engine.model.train()
    engine.optimizer.zero_grad(set_to_none=True)
    router = engine.router_aux
    n_micro = sum(1 for mb in kept if mb)  # M+: the router term is a mean over non-empty micro-batches
    batches, nll_total = [], torch.zeros((), dtype=torch.float64)
    for m, ids in enumerate(mine):
        batch = engine.collator([engine.dataset[i] for i in ids])
        batches.append(batch)
        is_last = m == len(mine) - 1
        ctx = acc.no_sync(engine.model) if (ws > 1 and not is_last) else _nullcontext()
        with ctx:
            loss, nll = micro_batch_loss(engine.model, batch, acc.device, normaliser, ws, n_micro, router)
            acc.backward(loss)
        nll_total += nll.detach().double().cpu()

    observer.on_after_backward(engine, step)
    params = [p for p in engine.model.parameters() if p.requires_grad]
    clip = t.max_grad_norm if t.max_grad_norm and t.max_grad_norm > 0 else None
    if clip is not None:
        grad_norm = acc.clip_grad_norm_(params, clip)
    else:
        acc.unscale_gradients()
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    grad_norm = float(distributed.full(grad_norm))  # FSDP: a replicated DTensor
    lrs = engine.applied_lrs()
    engine.optimizer.step()
    engine.scheduler.step()

    if ws > 1:
        nll_total = acc.reduce(nll_total.to(acc.device), reduction="sum").cpu()
    loss_value = float(nll_total) / normaliser if normaliser > 0 else 0.0
    record = StepRecord(step=step, epoch=epoch, micro_batches=[list(mb) for mb in micro_batches], lrs=lrs,
                        normaliser=int(normaliser), loss=loss_value, grad_norm=grad_norm,
                        clipped=bool(clip is not None and grad_norm > clip), rng_seed=seed, excluded=dropped)
    observer.on_step_end(engine, record, batches)
    return record


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
