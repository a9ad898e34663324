"""Deletion requests that arrive while training runs.

``Trainer(config, online_unlearner=OnlineUnlearner())`` (``auto``; or e.g.
``OnlineUnlearner("LMCleanerSampleLevel", K=50)``);
requests come from ``trainer.request_forget(ids)`` or lines
``{"request_id": "r1", "ids": [17, 203]}`` appended to
``training.forget_request_file``. Before the next step the trainer calls this
object: it flushes the recorder, computes the correction at the current step
``tau`` from the trajectory so far, loads the corrected parameters *and
optimizer state* into the live engine, and the trainer then excludes the ids
from every later batch. The recorder writes an anchor (exact state after the
correction), so later replays and later requests stay exact.

Several processes (``torchrun``): the trainer gathers every rank's pending
requests at the top of each step, so all ranks apply the same requests at the
same step; here the main rank flushes the log, every rank waits for it,
replays / propagates from it together (replay at the recorded world size;
LMCleaner data-parallel, see ``unlearn.functional``) and loads the same
result, so the ranks stay identical.
"""

from __future__ import annotations

from typing import Any

import torch

from ..train import checkpoint as ckpt
from ..train import distributed as dist_utils
from .session import UnlearnError, UnlearnSession


def load_state_into(engine, params: dict[str, torch.Tensor], opt_state: dict[str, dict[str, torch.Tensor]] | None):
    """Copy full parameters (and optimizer state, by parameter name) into a live engine
    (this rank's part of each when it is sharded)."""
    live = engine.trainable()
    for name, value in params.items():
        dist_utils.assign(live[name], value)
    if opt_state is not None:
        _, meta = ckpt.optimizer_to_flat(engine.optimizer)
        flat = {}
        for n, st in opt_state.items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    p = live.get(n)
                    sharded_like_p = p is not None and dist_utils.is_sharded(p) and tuple(v.shape) == tuple(p.shape)
                    flat[f"{n}::{k}"] = dist_utils.place(v, p) if sharded_like_p else v
        ckpt.optimizer_from_flat(engine.optimizer, flat, meta)


class OnlineUnlearner:
    """Applies a deletion request to the live run (see the module docstring).

    ``method`` (default ``auto``, as in ``lmcleaner unlearn``: exact replay unless an
    approximation's own estimate is within its ``max_error``; measured online in
    ``benchmarks/online.py`` it answered with replay at replay's cost where LMCleaner's full
    window cost up to 2.6x and left an error of 0.005). ``method_args`` are the method's
    arguments. ``fallback_to_replay`` (default true, as in ``lmcleaner unlearn``): a
    correction that its own estimate or the divergence guard flags as no better than doing
    nothing is replaced by exact replay before it reaches the live model; the event records
    both."""

    def __init__(self, method: str = "auto", fallback_to_replay: bool = True, **method_args: Any):
        self.method = method
        self.fallback_to_replay = fallback_to_replay
        self.method_args = method_args

    def __call__(self, trainer, ids: list[int], step: int) -> dict[str, Any]:
        recorder = trainer.recorder
        if getattr(recorder, "log_dir", None) is None:
            raise UnlearnError("online unlearning needs the trajectory recorder (training_logger.enabled=true)")
        if step == 0:
            return {"method": self.method, "note": "request before the first step: nothing learned yet"}
        recorder.flush(wait=True)
        # Several ranks: all apply the request at this step (the trainer synchronises requests), the
        # main one has just flushed the log they all read, and they compute the correction together.
        trainer.accelerator.wait_for_everyone()
        # the live run's own log: the user's own model setting applies (it is not a received run)
        session = UnlearnSession(log_dir=recorder.log_dir,
                                 trust_remote_code=bool(trainer.config.model.trust_remote_code))
        session.progress_leave = False  # inside the training bar
        session.continues_training = True  # corrections that support it resynchronise the optimizer state
        used = [i for i in ids if session.log.steps_containing([i])]
        if not used:
            return {"method": self.method, "note": "samples not used yet: excluded from now on"}
        result = self.compute(session, used)
        load_state_into(trainer.engine, result.params, result.opt_state)
        info = {k: v for k, v in result.info.items() if k in ("method", "K", "hessian_mode", "steps_touched",
                                                               "correction_norm", "seconds", "grad_equivalents_total",
                                                               "tail_steps", "estimated_error", "diverged",
                                                               "fallback_from", "chosen", "auto")}
        return info

    def compute(self, session: UnlearnSession, ids: list[int]):
        """The correction loaded into the live engine (an ``UnlearnResult``); a subclass may
        change what is loaded (``benchmarks/online.py`` splits parameters from optimizer state)."""
        return session.run(self.method, ids, fallback_to_replay=self.fallback_to_replay, **self.method_args)
