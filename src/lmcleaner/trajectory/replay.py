"""``TrajectoryReplayer``: exact past parameters, optimizer states and gradients.

Why replay: light mode keeps only checkpoints every ``C`` steps; ``theta_s``
for any other step comes from the nearest restore point at or before ``s``
and the recorded steps in between, run through ``train.engine.run_step`` —
the very function that trained the model, so the result is bit for bit the
trained trajectory on the same hardware and library versions, run with the
recorded intra-op thread count (``meta.json: torch_num_threads``); every
replayed step is checked against its record (loss, gradient norm, learning
rates).

Efficiency: the replayer remembers which ``theta`` its engine holds and only
goes back to a restore point when asked for an earlier step, so iterating
over a range replays forward once, never once per step.

Counterfactual: :meth:`TrajectoryReplayer.counterfactual` re-runs steps with
extra ids removed from every batch (normaliser recomputed), the exact-retrain
oracle of DESIGN §3 (``replay`` unlearning).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from ..train import checkpoint as ckpt
from ..train import distributed as dist_utils
from ..train.engine import Engine, NullObserver, run_step
from .jsonl import TrajectoryLogError
from .reader import TrajectoryLog
from .reconstruct import build_trainer, preserved_rng
from . import restore
from .restore import RestorePoint
from .types import ReplayedStep, StepRecord
from .writer import kept_micro_batches


class ReplayMismatchError(TrajectoryLogError):
    """A replayed step did not reproduce its record."""


@dataclass
class CounterfactualResult:
    """The state after replaying ``start..end-1`` without ``excluded`` (from ``restored_from``)."""

    start: int
    end: int
    restored_from: int
    excluded: list[int]
    params: dict[str, torch.Tensor]  # theta_end of the counterfactual run (copies)
    opt_state: dict[str, dict[str, torch.Tensor]]
    records: list[StepRecord] = field(default_factory=list)  # the counterfactual steps
    engine: Engine | None = None  # holds the same state live (model, optimizer, scheduler)

    @property
    def steps_replayed(self) -> int:
        """Training steps run, including those from the restore point to ``start``."""
        return self.end - self.restored_from


class _Capture(NullObserver):
    """Copies the unclipped gradient (after backward, before clipping; the whole step's,
    all-reduced over ranks, gathered when sharded) and the step's batches."""

    def __init__(self, named: dict[str, torch.nn.Parameter], grads: bool):
        self.named, self.want_grads = named, grads
        self.grads: dict[str, torch.Tensor] | None = None
        self.batches: list[dict[str, torch.Tensor]] = []

    def on_after_backward(self, engine, step):
        if self.want_grads:
            self.grads = {n: (dist_utils.full(p.grad.detach()).clone() if p.grad is not None
                              else torch.zeros(p.shape, dtype=p.dtype, device=dist_utils.local(p).device))
                          for n, p in self.named.items()}

    def on_step_end(self, engine, record, batches):
        self.batches = list(batches)


class TrajectoryReplayer:
    """Replays a recorded run. ``trainer``: an already built one (else rebuilt from ``meta.json``)."""

    def __init__(self, log: TrajectoryLog | str, trainer: Any = None, verify: bool = True,
                 trust_remote_code: bool = False):
        self.log = log if isinstance(log, TrajectoryLog) else TrajectoryLog(log)
        self._trainer = trainer
        self.trust_remote_code = trust_remote_code  # the current user's choice, never the log's
        self.verify = verify
        self._pos: int | None = None  # the step whose theta the engine holds (None: unknown)
        self._origin: RestorePoint | None = None  # where that state was restored from
        self.steps_run = 0  # training steps executed so far (cost accounting)
        self.bar = None  # the progress display of the current long operation (see progress())
        self._schedule_total = int(self.log.meta.get("total_steps", 0))  # what the rebuilt scheduler was built for

    @property
    def trainer(self):
        if self._trainer is None:
            self._trainer = build_trainer(self.log, trust_remote_code=self.trust_remote_code)
        return self._trainer

    @property
    def engine(self) -> Engine:
        return self.trainer.engine

    @property
    def position(self) -> int | None:
        return self._pos

    # ------------------------------------------------------------- moving
    def _restore(self, point: RestorePoint) -> None:
        e = self.engine
        total = self.log.total_steps_at(point.step)
        if self._schedule_total != total:  # the run was resumed with another max_steps (see restore)
            from ..train.optim import build_scheduler

            e.scheduler = build_scheduler(getattr(e.optimizer, "optimizer", e.optimizer), self.trainer.t, total)
            self._schedule_total = total
        # the files are hashed against what the log recorded: a corrupted or foreign checkpoint is refused
        ckpt.load_checkpoint(point.path, e.trainable(), e.optimizer, e.scheduler, restore_rng=False,
                             expected=point.files)
        self._pos, self._origin = point.step, point

    def seek(self, step: int) -> RestorePoint:
        """Bring the engine to ``theta_step``; returns the restore point used."""
        point = self.log.restore_point_for(step)
        # Go on from the current state only if it is on the recorded trajectory and
        # no online correction happened between its origin and ``step``.
        if not (self._pos is not None and self._origin is not None and point.step <= self._pos <= step
                and restore.is_valid(self._origin, step, self.log.event_steps, self.log.barrier_steps)):
            self._restore(point)
        while self._pos < step:
            self._run(self._pos)
        return point

    def _run(self, t: int, extra: frozenset[int] = frozenset(), observer=None) -> StepRecord:
        rec = self.log.record(t)
        with preserved_rng(), recorded_threads(self.log.meta.get("torch_num_threads")):
            out = run_step(self.engine, t, rec.epoch, rec.micro_batches, set(rec.excluded) | extra,
                           observer or NullObserver())
        self.steps_run += 1
        self._pos = t + 1
        if self.bar is not None:
            self.bar.update(1)
        if self.verify and not extra:
            self._check(rec, out)
        return out

    def _check(self, rec: StepRecord, out: StepRecord) -> None:
        same_ws = self.engine.world_size == int(self.log.meta.get("world_size", 1))
        pairs = [("normaliser", rec.normaliser, out.normaliser), ("loss", rec.loss, out.loss),
                 ("grad_norm", rec.grad_norm, out.grad_norm), ("lrs", rec.lrs, out.lrs),
                 ("excluded", sorted(rec.excluded), sorted(out.excluded))]
        for name, a, b in pairs:
            if a == b or _close(a, b, exact=same_ws):
                continue
            raise ReplayMismatchError(
                f"step {rec.step}: replayed {name} {b!r} != recorded {a!r}; the replay environment differs "
                "(torch version, thread count, hardware) or the checkpoints do not belong to this log")

    @contextmanager
    def progress(self, total: int, desc: str, enabled: bool = True, leave: bool = True) -> Iterator[Any]:
        """Count every replayed step of the enclosed operation on one progress display (bar + ETA)."""
        from ..telemetry.progress import progress_bar

        bar = progress_bar(total=max(int(total), 1), desc=desc, enabled=enabled, leave=leave, unit="step")
        outer, self.bar = self.bar, bar
        try:
            yield bar
        finally:
            self.bar = outer
            if bar.total and bar.n < bar.total:  # the operation replayed fewer steps than budgeted: it is done
                bar.total = bar.n
            bar.close()

    # ------------------------------------------------------------- reading
    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.engine.trainable()

    def _params(self) -> dict[str, torch.Tensor]:
        return self.engine.full_trainable()

    def _opt_state(self) -> dict[str, dict[str, torch.Tensor]]:
        opt = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for n, p in self.engine.trainable().items():
            st = opt.state.get(p, {})
            out[n] = {k: (dist_utils.full(v.detach()).clone() if torch.is_tensor(v) else torch.tensor(v))
                      for k, v in st.items() if v is not None}
        return out

    def _all_batches(self, rec: StepRecord) -> list[dict[str, torch.Tensor]]:
        """Every micro-batch of the step, as one process trains it (a rank runs only its share)."""
        e = self.engine
        return [e.collator([e.dataset[i] for i in ids]) for ids in kept_micro_batches(rec)]

    def params_at(self, step: int) -> dict[str, torch.Tensor]:
        """``theta_step`` (trainable parameters, copies)."""
        self.seek(step)
        return self._params()

    def state_at(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """(``theta_step``, optimizer state before step ``step``) by parameter name."""
        self.seek(step)
        return self._params(), self._opt_state()

    def iter_steps(self, start: int | None = None, end: int | None = None, *, grads: bool = True,
                   opt_state: bool = True) -> Iterator[ReplayedStep]:
        """``ReplayedStep`` for ``start..end-1`` (default: the whole window), replaying forward once.

        ``batches`` hold all micro-batches of the step as trained (excluded ids
        removed; every rank's, also when this replay runs on several ranks);
        ``grad`` is the unclipped gradient of the step loss. Under several
        processes every rank must iterate (the steps are collective).
        """
        lo, hi = self.log.window
        start = lo if start is None else start
        end = hi if end is None else end
        if start < lo or end > hi:
            raise TrajectoryLogError(f"{self.log.log_dir}: steps {start}..{end - 1} are outside the replayable "
                                     f"window {lo}..{hi - 1}")
        if start >= end:
            return
        named = self.engine.trainable()
        for t in range(start, end):
            self.seek(t)  # no-op unless the caller moved the engine or an online correction happened at t
            params = self._params()
            state = self._opt_state() if opt_state else None
            cap = _Capture(named, grads)
            self._run(t, observer=cap)
            rec = self.log.record(t)
            batches = cap.batches if self.engine.world_size == 1 else self._all_batches(rec)
            yield ReplayedStep(record=rec, params=params, batches=batches,
                               grad=cap.grads if grads else None, opt_state=state)

    # ------------------------------------------------------- counterfactual
    def load_state(self, params: dict[str, torch.Tensor],
                   opt_state: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Overwrite the engine's parameters (and optimizer state, by name) at its current
        step; the scheduler stays. The engine is then off the recorded trajectory. ``params``
        and ``opt_state`` are full tensors (``_params``, ``_opt_state``): under FSDP each rank
        keeps its part (``train.distributed.assign``)."""
        live = self.engine.trainable()
        for name, value in params.items():  # full values; this rank's part when sharded (FSDP)
            dist_utils.assign(live[name], value)
        if opt_state is not None:
            opt = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
            for name, p in live.items():
                st = opt.state.get(p)
                for k, v in opt_state.get(name, {}).items():
                    if st is not None and k in st and torch.is_tensor(st[k]) and k != "step":
                        dist_utils.assign(st[k], v)
        self._origin = None

    def step_without(self, t: int, extra_excluded: Iterable[int]) -> StepRecord:
        """Run recorded step ``t`` from whatever state the engine holds, with
        ``extra_excluded`` removed from its batch (a counterfactual step). The
        engine is off the recorded trajectory afterwards (the next ``seek``
        restores a checkpoint)."""
        if self._pos is not None and self._pos != t:
            raise TrajectoryLogError(f"step_without({t}): the engine holds the state before step {self._pos}")
        out = self._run(t, extra=frozenset(int(i) for i in extra_excluded))
        self._origin = None
        return out

    def continue_without(self, extra_excluded: Iterable[int], end: int
                         ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """Run the recorded steps from the engine's position up to ``end`` with ``extra_excluded``
        removed, from whatever state it holds (position it with ``seek`` / ``load_state``), and
        return copies of ``(theta', opt')`` at ``end``."""
        extra = frozenset(int(i) for i in extra_excluded)
        while self._pos < end:
            self.step_without(self._pos, extra)
        return self._params(), self._opt_state()

    def counterfactual_stops(self, extra_excluded: Iterable[int], stops: Iterable[int]
                             ) -> Iterator[tuple[int, tuple[dict, dict], tuple[dict, dict]]]:
        """Continue a counterfactual from the state the engine holds and yield, at each of the
        increasing ``stops`` (restore points, so the recorded state there is read, not
        replayed): ``(stop, (theta', opt'), (theta, opt))``, counterfactual then recorded.
        The caller positions the engine first (``seek`` and, to carry a deviation,
        ``load_state``); stop iterating to end the walk."""
        extra = frozenset(int(i) for i in extra_excluded)
        for p in stops:
            cf = self.continue_without(extra, p)
            recorded = self.state_at(p)
            yield p, cf, recorded
            self.load_state(*cf)  # continue the counterfactual from theta'_p

    def counterfactual(self, extra_excluded: Iterable[int], start: int | None = None,
                       end: int | None = None) -> CounterfactualResult:
        """Replay ``start..end-1`` with ``extra_excluded`` removed from every batch.

        ``start`` defaults to the first recorded step containing one of the
        ids, ``end`` to the end of the log (``tau``). The engine is restored
        from the latest restore point at or before ``start`` and replayed
        exactly up to ``start`` first. Returns copies of the final state; the
        live engine is in ``result.engine`` (and is no longer on the recorded
        trajectory: the next ``seek`` restores a checkpoint).
        """
        extra = frozenset(int(i) for i in extra_excluded)
        end = self.log.end if end is None else end
        if end > self.log.end:
            raise TrajectoryLogError(f"{self.log.log_dir}: end={end} is past the last recorded step "
                                     f"{self.log.last_step}")
        if start is None:
            hits = [s for s in self.log.steps_containing(extra) if s < end]
            start = hits[0] if hits else end
        point = self.seek(start)
        records = [self._run(t, extra=extra) for t in range(start, end)]
        self._pos, self._origin = None, None
        return CounterfactualResult(start=start, end=end, restored_from=point.step, excluded=sorted(extra),
                                    params=self._params(), opt_state=self._opt_state(), records=records,
                                    engine=self.engine)


@contextmanager
def recorded_threads(n: int | None) -> Iterator[None]:
    """Run with the intra-op thread count of the recorded run: CPU reductions depend on it
    (measured: a 1-thread replay of a 2-thread run differs in the gradient norm)."""
    before = torch.get_num_threads()
    if not n or int(n) == before:
        yield
        return
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _close(a: Any, b: Any, exact: bool) -> bool:
    if exact:
        return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, exact) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7)
    return False
