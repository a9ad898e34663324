"""Several processes: the strategy (DDP or FSDP2, both through Accelerate) and the
few operations the rest of the library needs so that it never looks at sharding.

Strategies (``training.distributed_strategy``), used when the launcher starts
more than one process (``torchrun --nproc_per_node N``):

- ``ddp``: every rank holds the whole model; gradients are all-reduced.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) through Accelerate's
  ``FullyShardedDataParallelPlugin(fsdp_version=2)``, one FSDP unit per
  decoder layer (the model's ``_no_split_modules``) plus embedding and head.
  Parameters, gradients and optimizer state are ``DTensor`` s sharded along
  dim 0. ``training.fsdp_sharding_strategy``: ``FULL_SHARD`` (parameters
  re-sharded after forward, ZeRO-3) or ``SHARD_GRAD_OP`` (kept gathered from
  forward to backward, ZeRO-2). FSDP2 has no ``NO_SHARD`` (that is ``ddp``) and
  hybrid sharding needs a 2-D device mesh, which is not wired up here.

With either strategy the step is the same function (``engine.run_step``):
FSDP reduces gradients with the same average as DDP, so the loss scaling that
makes DDP a sum over ranks serves both. One process ignores the strategy.

Why the accelerator state is set by hand on CPU: Accelerate 1.15 selects
``DistributedType.FSDP`` only for accelerator devices (``state.py`` does it in
the MULTI_GPU/NPU/... branch, not for MULTI_CPU), while FSDP2 itself runs on
CPU over gloo (measured with torch 2.13: two ranks train, clip and step).
So with ``cpu=True`` and several ranks the same plugin is installed on the
state that Accelerate would have built on GPUs; that is the path the CPU
tests run.

Sharded values: :func:`full` gathers a ``DTensor`` (a collective: every rank
must call it, in the same order), :func:`place` turns a full tensor into what
a possibly sharded target holds, :func:`plain_copy` builds an unsharded copy of
a sharded model (for export and for the unlearning engine, which evaluates
the model functionally at recorded full parameters).
"""

from __future__ import annotations

import copy
import json
import logging
from itertools import chain
from typing import Any

import torch

log = logging.getLogger("lmcleaner.training")
STRATEGIES = ("ddp", "fsdp")
# fsdp_sharding_strategy -> FSDP2 reshard_after_forward
SHARDING = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}


class DistributedConfigError(ValueError):
    pass


def check_strategy(t) -> None:
    """One-line errors for ``training.distributed_strategy`` / ``fsdp_sharding_strategy``."""
    if t.distributed_strategy not in STRATEGIES:
        raise DistributedConfigError(f"training.distributed_strategy={t.distributed_strategy!r}: choose one of "
                                     f"{list(STRATEGIES)}")
    if t.distributed_strategy == "fsdp" and str(t.fsdp_sharding_strategy).upper() not in SHARDING:
        hint = " (that is distributed_strategy=ddp)" if str(t.fsdp_sharding_strategy).upper() == "NO_SHARD" else ""
        raise DistributedConfigError(f"training.fsdp_sharding_strategy={t.fsdp_sharding_strategy!r} is not supported"
                                     f"{hint}: choose one of {list(SHARDING)}")


def launched_world_size() -> int:
    """Processes the launcher started (``torchrun`` sets ``WORLD_SIZE``), before any accelerator exists."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def same_global_batch(t, recorded_world_size: int, world_size: int | None = None) -> None:
    """Set ``t.gradient_accumulation_steps`` so that this launch's global batch is the recorded
    one (the batch plan depends on ``accumulation x world size`` only); a one-line error when
    the recorded number of micro-batches per step does not split evenly over the ranks."""
    ws = launched_world_size() if world_size is None else world_size
    micro = int(t.gradient_accumulation_steps) * int(recorded_world_size)
    if ws == recorded_world_size:
        return
    if micro % ws:
        raise DistributedConfigError(
            f"the run was recorded on {recorded_world_size} ranks with {micro} micro-batches per step, which do not "
            f"split over {ws} processes: launch with --nproc_per_node {recorded_world_size} (bit-exact) or 1")
    t.gradient_accumulation_steps = micro // ws


def fsdp_plugin(t):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=SHARDING[str(t.fsdp_sharding_strategy).upper()],
        auto_wrap_policy="transformer_based_wrap",
        # our checkpoints are written by lmcleaner (safetensors shards + JSON), never by torch.distributed.checkpoint
        state_dict_type="SHARDED_STATE_DICT",
    )


def build_accelerator(t):
    """A fresh ``Accelerator`` for the run's precision and strategy.

    The process-wide ``AcceleratorState`` is reset when an earlier run in this
    process used another precision or strategy (the process group, held by
    ``PartialState``, is kept)."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    check_strategy(t)
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DistributedConfigError("training.mixed_precision=fp16 needs a GPU: on CPU it would silently train in "
                                     "float32; use training.mixed_precision=bf16 (CPU autocast) or no")
    fsdp = t.distributed_strategy == "fsdp" and launched_world_size() > 1
    if t.distributed_strategy == "fsdp" and not fsdp:
        log.info("training.distributed_strategy=fsdp in one process: nothing to shard, the model stays whole")
    state = AcceleratorState._shared_state
    if state and (state.get("_mixed_precision") not in (None, t.mixed_precision)
                  or (state.get("distributed_type") == DistributedType.FSDP) != fsdp):
        AcceleratorState._reset_state(reset_partial_state=False)
        # Accelerate records FSDP on the process-level state too; a later DDP run must not inherit it
        if PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:
            PartialState._shared_state["distributed_type"] = (DistributedType.MULTI_GPU if torch.cuda.is_available()
                                                              else DistributedType.MULTI_CPU)
    if not fsdp:  # a plugin given to an earlier Accelerator in this process sets this for all later ones
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    plugin = fsdp_plugin(t) if fsdp else None
    acc = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
    if fsdp and acc.distributed_type != DistributedType.FSDP:
        if acc.distributed_type != DistributedType.MULTI_CPU:
            raise DistributedConfigError(f"training.distributed_strategy=fsdp: Accelerate set up {acc.distributed_type} "
                                         "instead of FSDP")
        # Accelerate only picks FSDP for accelerator devices; FSDP2 runs on CPU/gloo (module docstring).
        # Installed as Accelerate does on GPUs: on both the accelerator and the process-level state.
        if t.mixed_precision != "no":
            plugin.set_mixed_precision(t.mixed_precision)
        acc.state.fsdp_plugin = plugin
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


def is_fsdp(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


# ----------------------------------------------------------------- tensors
def is_sharded(x: Any) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def full(x: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a ``DTensor``; a no-op otherwise)."""
    return x.full_tensor() if is_sharded(x) else x


def local(x: torch.Tensor) -> torch.Tensor:
    """What this rank stores of ``x``."""
    return x.to_local() if is_sharded(x) else x


def place(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (full) as ``like`` holds it: the same ``DTensor`` layout (this rank's
    part, no communication) or a plain tensor on ``like``'s device and dtype."""
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"shape {tuple(value.shape)} does not match {tuple(like.shape)}")
    value = value.to(device=local(like).device, dtype=like.dtype)
    if is_sharded(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value


def from_local(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``DTensor`` laid out like ``like`` from this rank's part (no communication)."""
    from torch.distributed.tensor import DTensor

    if tuple(part.shape) != tuple(like.to_local().shape):
        raise ValueError(f"local shard {tuple(part.shape)} does not match {tuple(like.to_local().shape)}")
    return DTensor.from_local(part.to(device=like.to_local().device, dtype=like.dtype), like.device_mesh,
                              like.placements, run_check=False, shape=like.shape, stride=like.stride())


def layout(x: torch.Tensor) -> dict[str, Any]:
    """JSON description of how ``x`` is split over ranks (``shard_dim`` None: replicated)."""
    if not is_sharded(x):
        return {"shape": list(x.shape), "shard_dim": None}
    from torch.distributed.tensor import Replicate, Shard

    pl = list(x.placements)
    if len(pl) != 1 or not isinstance(pl[0], (Shard, Replicate)):
        raise ValueError(f"unsupported sharding {pl} (only 1-D meshes with Shard(d) or Replicate)")
    return {"shape": list(x.shape), "shard_dim": pl[0].dim if isinstance(pl[0], Shard) else None}


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full ``value`` into ``param`` (this rank's part when sharded)."""
    local(param).copy_(local(place(value, param)))


def gather(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached full copies (every rank, same order: collectives when sharded)."""
    return {n: full(t.detach()).clone() for n, t in named.items()}


# ------------------------------------------------------------------ models
def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose tensors live on the meta device (no memory), made
    before sharding, so an unsharded copy can be materialised later (:func:`plain_copy`)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def plain_copy(model: torch.nn.Module, skeleton: torch.nn.Module | None, here: bool = True,
               device: str | torch.device = "cpu") -> torch.nn.Module | None:
    """An unsharded module with ``model``'s values, or ``model`` itself deep-copied when nothing is sharded.

    Sharded: a collective (every rank calls it, tensor by tensor, so a rank
    that does not keep the copy holds one full tensor at a time); ``here``
    says whether this rank keeps the copy (``None`` otherwise)."""
    named = list(chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)))
    if not any(is_sharded(t) for _, t in named):
        return copy.deepcopy(model) if here else None
    if skeleton is None:
        raise ValueError("a sharded model needs the meta skeleton taken before sharding (meta_skeleton)")
    out = copy.deepcopy(skeleton).to_empty(device=device) if here else None
    targets = dict(chain(out.named_parameters(remove_duplicate=False), out.named_buffers(remove_duplicate=False))) \
        if out is not None else {}
    with torch.no_grad():
        for n, t in named:
            value = full(t.detach())
            if out is not None:
                targets[n].copy_(value)
    if out is not None:
        out.train(model.training)
    return out


# ------------------------------------------------------------- collectives
def all_gather_json(obj: Any, accelerator) -> list[Any]:
    """Every rank's JSON-able ``obj`` (``None``: nothing), in rank order.

    JSON bytes in tensors (no pickle); one small collective when every rank
    passes ``None`` (the per-step case), two otherwise."""
    if accelerator.num_processes <= 1:
        return [obj]
    import torch.distributed as dist

    device = accelerator.device
    payload = b"" if obj is None else json.dumps(obj).encode()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(accelerator.num_processes)]
    dist.all_gather(sizes, torch.tensor([len(payload)], dtype=torch.long, device=device))
    width = max(int(s) for s in sizes)
    if width == 0:
        return [None] * len(sizes)
    padded = torch.zeros(width, dtype=torch.uint8, device=device)
    if payload:
        padded[:len(payload)] = torch.tensor(list(payload), dtype=torch.uint8, device=device)
    parts = [torch.zeros(width, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[:int(s)].tolist()).decode()) if int(s) else None for p, s in zip(parts, sizes)]


def main_process_pid(device: Any = None) -> int:
    """The main (rank 0) process's PID, on every rank: it names the one temporary directory all
    ranks write into (a sharded checkpoint, a multi-process retrain), stamped like a one-process
    one so that a killed writer's leftover is recognised by its dead PID and cleaned up.
    A collective (one broadcast of one integer) when several processes run."""
    import os

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return os.getpid()
    t = torch.tensor([os.getpid()], dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())
