"""``TrainingLogger``: the trajectory recorder the trainer calls around each step.

Why it looks like this:

- The trainer talks to it through ``train.hooks.NullRecorder``; it never
  branches on whether recording is on.
- Per step it only copies what the step will overwrite (parameters before the
  step in heavy mode, the gradient for the empirical Fisher) and hands the
  rest to :class:`~lmcleaner.trajectory.writer.LogWriter` once per flush;
  light mode costs a list append per step.
- It decides which trainer checkpoints exist (``wants_checkpoint``: ``theta_0``
  and every ``checkpoint_interval`` steps) and keeps those the window needs
  (``required_checkpoints``); the trainer's rotation deletes the others.
- A checkpoint must find its steps in the log (resume continues the log from
  it). When the trainer is about to write one, the recorder starts a flush
  that runs while the checkpoint is written and waits for it in
  ``on_checkpoint`` (usually already done). Only if the process dies in the
  few milliseconds between the checkpoint's rename and the end of that flush
  can a checkpoint be ahead of the log; resume then refuses with the
  checkpoint to resume from instead. These waits are the only ones on disk
  I/O, and only at checkpoint steps.
- After an online deletion it writes an *anchor* (parameters + optimizer),
  since the correction happens outside any recorded step (see ``restore``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..train import checkpoint as ckpt
from ..train import distributed as dist_utils
from ..train.engine import step_seed
from ..train.hooks import NullRecorder
from . import layout, restore
from .jsonl import TrajectoryLogError, encode_line, read_json, rewrite_lines, scan, write_json_atomic
from .settings import RecorderSettings, resolve_settings
from .shards import truncate_shard
from .types import StepRecord
from .writer import _STOP, EventItem, FlushItem, LogWriter, StepItem, kept_micro_batches

log = logging.getLogger("lmcleaner.trajectory")


@dataclass
class RecorderStats:
    """Time the *training thread* spent in the recorder (the cost training sees)."""

    steps: int = 0
    hook_seconds: float = 0.0  # everything inside the hooks, curvature included
    curvature_seconds: float = 0.0
    blocked_seconds: float = 0.0  # waiting on the writer: full queue or a checkpoint sync
    sync_flushes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "hook_seconds": self.hook_seconds, "curvature_seconds": self.curvature_seconds,
                "blocked_seconds": self.blocked_seconds, "sync_flushes": self.sync_flushes,
                "hook_us_per_step": 1e6 * self.hook_seconds / max(self.steps, 1)}


class TrainingLogger(NullRecorder):
    """Records the training trajectory into ``log_dir`` (see ``layout`` for the files).

    ``config``: the ``training_logger`` block (``TrainingLoggerConfig``, a dict,
    or already resolved :class:`RecorderSettings`). Nothing touches the disk
    before ``on_train_begin``.
    """

    def __init__(self, config: Any, log_dir: str | Path):
        self.settings: RecorderSettings = config if isinstance(config, RecorderSettings) else resolve_settings(config)
        self.log_dir = Path(log_dir)
        self.meta: dict[str, Any] | None = None
        self.engine = None
        self.writer: LogWriter | None = None
        self.stats = RecorderStats()
        self._points: dict[tuple[int, str], restore.RestorePoint] = {}
        self._event_steps: list[int] = []
        self._barriers: list[int] = []  # resume steps where max_steps changed
        self._params: dict[str, torch.nn.Parameter] = {}
        self._before: dict[str, torch.Tensor] | None = None
        self._grads: dict[str, torch.Tensor] | None = None
        self._total_steps = 0
        self._save_steps = 0
        self._closed = False
        self._last_step = -1  # last step handed to the writer
        self._before_checkpoint: threading.Event | None = None  # flush started for an expected checkpoint
        self._buffer: list[Any] = []  # items for the next flush

    # ------------------------------------------------------------ lifecycle
    def on_train_begin(self, engine, meta: dict[str, Any], resume_step: int) -> None:
        self.engine = engine
        self._params = dict(engine.trainable())
        self._last_step = resume_step - 1
        training = meta.get("config", {}).get("training", {})
        self._total_steps = int(meta.get("total_steps", 0))
        self._save_steps = int(training.get("save_steps") or 0)
        resuming = bool(training.get("resume_from_checkpoint"))
        full = self._full_meta(engine, meta)
        path = self.log_dir / layout.META
        if path.exists():
            old = read_json(path)
            if old.get("run_fingerprint") != full["run_fingerprint"]:
                raise TrajectoryLogError(
                    f"{self.log_dir} holds the training log of another run (run fingerprint "
                    f"{old.get('run_fingerprint')} != {full['run_fingerprint']}: different data, model, batch plan or "
                    "optimizer); choose another training_logger.log_dir")
            if not resuming:
                raise TrajectoryLogError(
                    f"{self.log_dir} already holds a training log of this run; resume it "
                    "(training.resume_from_checkpoint=latest) or choose another training_logger.log_dir")
            if old.get("storage") != self.settings.storage:
                raise TrajectoryLogError(
                    f"{self.log_dir} was recorded with storage={old.get('storage')}; resume with "
                    f"training_logger.storage={old.get('storage')} (got {self.settings.storage})")
            batch_index, first = self._resume_log(resume_step, meta)
            resumes = [r for r in old.get("resumes", []) if int(r["step"]) < resume_step]
            old["resumes"] = resumes + [{"step": resume_step, "time": time.time(), "total_steps": self._total_steps}]
            self._barriers = _barriers(old)
            write_json_atomic(path, old)
            self.meta = old
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for name in layout.JSONL_FILES:
                (self.log_dir / name).touch()
            write_json_atomic(path, full)
            self.meta = full
            batch_index, first = {}, resume_step
            if resume_step > 0:
                self._add_resume_checkpoint(resume_step, meta)
        status = {"run_fingerprint": self.meta["run_fingerprint"], "storage": self.settings.storage,
                  "world_size": meta.get("world_size", 1)}
        self.writer = LogWriter(self.log_dir, self.settings, resume_step, first, batch_index, status,
                                collate_ids=self._collate_ids)
        self.writer.start()

    def _full_meta(self, engine, meta: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        bs = meta.get("batch_size")
        if s.batch_size_at_training is not None and bs is not None and s.batch_size_at_training != bs:
            log.warning("training_logger.batch_size_at_training=%s but training.batch_size=%s; the log records %s",
                        s.batch_size_at_training, bs, bs)
        out = json.loads(json.dumps(meta, default=str))
        out.update({
            "format": "lmcleaner-trajectory",
            "format_version": layout.FORMAT_VERSION,
            "created": time.time(),
            "storage": s.storage,
            "mode": s.mode,
            "window": s.window,
            "save_interval": s.save_interval,
            "checkpoint_interval": s.checkpoint_interval,
            "settings": s.to_json(),
            "updates_exact": s.store_updates and s.exact_updates,
            "diag_estimator": s.diag_estimator,
            "optimizer_type": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
            "optimizer_hparams": _json_safe(getattr(getattr(engine.optimizer, "optimizer", engine.optimizer),
                                                    "defaults", {})),
            "param_groups": [{k: _json_safe(v) for k, v in g.items() if k != "params"}
                             for g in engine.optimizer.param_groups],
            "param_shapes": {n: [list(p.shape), str(p.dtype).removeprefix("torch.")] for n, p in self._params.items()},
            # CPU reductions (e.g. the gradient norm) depend on it: bit-exact replay uses the same count
            "torch_num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
        })
        if meta.get("output_dir"):  # the run directory as seen from the log: a copied run finds its own files
            out["run_dir_relative"] = os.path.relpath(os.path.abspath(meta["output_dir"]),
                                                      os.path.abspath(self.log_dir))
        out["run_fingerprint"] = layout.run_fingerprint(out)
        return out

    def _resume_log(self, resume: int, meta: dict[str, Any]) -> tuple[dict[int, list[list[int]]], int]:
        """Continue an existing log at step ``resume``: drop what a crashed run wrote from there on."""
        from .reader import TrajectoryLog

        tl = TrajectoryLog(self.log_dir, tolerant=True)
        last = tl.last_step if tl.last_step is not None else (tl.first_step - 1 if tl.first_step is not None else -1)
        if tl.steps and last < resume - 1:
            earlier = [p for p in tl.all_restore_points if p.kind == restore.CHECKPOINT and p.step <= last + 1
                       and (p.path / "trainer_state.json").is_file()]
            hint = (f"training.resume_from_checkpoint={earlier[-1].path}" if earlier
                    else f"a checkpoint at or before step {last + 1}")
            raise TrajectoryLogError(
                f"{self.log_dir / layout.STEPS} ends at step {last} but training resumes at step {resume}: steps "
                f"{last + 1}..{resume - 1} are not recorded; resume from {hint}")
        for name in (layout.STEPS, layout.SAMPLES, layout.EVENTS):
            path = self.log_dir / name
            entries = [e for e in scan(path).entries if int(e["step"]) < resume]
            rewrite_lines(path, [encode_line(e) for e in entries], self.settings.fsync)
        self._truncate_shards(resume)
        for p in tl.all_restore_points:
            if p.step < resume or (p.step == resume and p.kind == restore.CHECKPOINT):
                self._points[(p.step, p.kind)] = p
            elif p.kind == restore.ANCHOR:
                shutil.rmtree(p.path, ignore_errors=True)
        self._event_steps = sorted({int(e["step"]) for e in tl.events if e.get("ids") and int(e["step"]) < resume})
        self._add_resume_checkpoint(resume, meta)
        batch_index = {r.step: r.micro_batches for r in tl.records() if r.step < resume}
        first = tl.first_step if tl.first_step is not None and tl.first_step < resume else resume
        return batch_index, first

    def _truncate_shards(self, resume: int) -> None:
        tdir = self.log_dir / layout.TENSORS_DIR
        if not tdir.is_dir():
            return
        for p in sorted(tdir.iterdir()):
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                continue
            rng = layout.parse_shard_name(p.name)
            if rng is not None and rng[1] >= resume:
                truncate_shard(p, resume)

    def _add_resume_checkpoint(self, resume: int, meta: dict[str, Any]) -> None:
        path = ckpt.checkpoint_dir(meta.get("output_dir", ""), resume)
        if (path / "trainer_state.json").is_file():
            files = ckpt.read_checksums(path)
            known = self._points.get((resume, restore.CHECKPOINT))
            if known is not None and known.files and files is not None and known.files != files:
                raise TrajectoryLogError(f"{path} does not belong to the log in {self.log_dir} (its checksums.json "
                                         f"differs from the hashes recorded in {layout.CHECKPOINTS}): resume from "
                                         "the checkpoint this log recorded, or start a new run")
            self._points[(resume, restore.CHECKPOINT)] = restore.RestorePoint(resume, path.resolve(), files=files)

    def close(self) -> None:
        if self._closed or self.writer is None:
            self._closed = True
            return
        self._closed = True
        self.flush(wait=True, closed=True)
        self.writer.queue.put(_STOP)
        self.writer.join()
        self._raise_if_failed()

    # ------------------------------------------------------------ per step
    def on_step_begin(self, engine, step: int, micro_batches: list[list[int]]) -> None:
        if self.settings.needs_snapshot:
            t0 = time.perf_counter()
            self._before = {n: p.detach().clone() for n, p in self._params.items()}
            self.stats.hook_seconds += time.perf_counter() - t0

    def on_after_backward(self, engine, step: int) -> None:
        if self.settings.diag_estimator == "empirical_fisher":
            t0 = time.perf_counter()
            self._grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                           for n, p in self._params.items()}
            self.stats.hook_seconds += time.perf_counter() - t0

    def on_step_end(self, engine, record: StepRecord, batches: list[dict]) -> None:
        t0 = time.perf_counter()
        self._raise_if_failed()
        s = self.settings
        item = StepItem(record)
        if s.store_updates:
            item.before = self._before
            item.after = {n: p.detach().clone() for n, p in self._params.items()}
        if s.store_batches:
            item.batches = list(batches)
        if s.diag_estimator == "hutchinson":
            from .curvature import hutchinson_diag

            c0 = time.perf_counter()
            item.diag = hutchinson_diag(engine.unwrapped, self._before, batches, record.normaliser,
                                        seed=step_seed(engine.seed, record.step, engine.rank),
                                        probes=s.diag_probes, device=engine.accelerator.device,
                                        loss_scale=float(engine.world_size), router=engine.router_aux,
                                        n_micro=sum(1 for mb in kept_micro_batches(record) if mb))
            self.stats.curvature_seconds += time.perf_counter() - c0
        elif s.diag_estimator == "empirical_fisher":
            item.grads = self._grads
        self._before, self._grads = None, None
        self._put(item)
        self._last_step = record.step
        tau = record.step + 1
        if self._checkpoint_expected(tau):
            # The checkpoint about to be written must find its steps in the log: start the
            # flush now so it overlaps the checkpoint write; on_checkpoint waits for it.
            self._before_checkpoint = self.flush(wait=False, track=True)
        elif tau % s.save_interval == 0:
            self.flush(wait=False)
        self.stats.steps += 1
        self.stats.hook_seconds += time.perf_counter() - t0

    def _put(self, item: Any) -> None:
        """Collect for the next flush (a list append: the writer is not woken per step)."""
        self._buffer.append(item)

    def _checkpoint_expected(self, tau: int) -> bool:
        return (tau >= self._total_steps > 0 or (self._save_steps > 0 and tau % self._save_steps == 0)
                or self.wants_checkpoint(tau))

    def flush(self, wait: bool = True, closed: bool = False, track: bool = False) -> threading.Event | None:
        """Ask the writer to persist everything handed over so far (``wait``: until it is on disk).

        The unlearning engine calls ``flush()`` before opening the live log
        during training so the reader sees every completed step.
        """
        if self.writer is None:
            return None
        done = threading.Event() if (wait or track) else None
        tau = self._last_step + 1
        item = FlushItem(self._restore_json(), retain_from=self._base(tau), closed=closed, done=done)
        t0 = time.perf_counter()
        batch, self._buffer = self._buffer, []
        batch.append(item)
        self.writer.queue.put(batch)
        if wait:
            done.wait()
            self.stats.sync_flushes += 1
        self.stats.blocked_seconds += time.perf_counter() - t0
        self._raise_if_failed()
        return done

    def _raise_if_failed(self) -> None:
        if self.writer is not None and self.writer.error is not None:
            err = self.writer.error
            if isinstance(err, OSError):  # disk full, read-only: one line naming the file and the fix
                from ..train.outputs import describe_os_error

                raise TrajectoryLogError(f"training log writer failed in {self.log_dir}: "
                                         f"{describe_os_error(err)}") from err
            raise TrajectoryLogError(f"training log writer failed in {self.log_dir}: {err}") from err

    # ------------------------------------------------------- checkpoints
    def wants_checkpoint(self, step: int) -> bool:
        """``theta_0`` and every ``checkpoint_interval`` steps (a pure function of the step:
        :class:`FollowerRecorder` on the other ranks must decide the same)."""
        return step % self.settings.checkpoint_interval == 0

    def on_checkpoint(self, step: int, path) -> None:
        self._points[(step, restore.CHECKPOINT)] = restore.RestorePoint(step, Path(path).resolve(),
                                                                        files=ckpt.read_checksums(path))
        self._prune_points(step)
        pending, self._before_checkpoint = self._before_checkpoint, None
        if pending is not None:
            t0 = time.perf_counter()
            pending.wait()
            self.stats.blocked_seconds += time.perf_counter() - t0
        behind = self.writer is not None and self.writer.committed_step < step - 1
        self.flush(wait=behind)  # also records the new restore point in checkpoints.json

    def required_checkpoints(self, step: int) -> set[int]:
        base = self._base(step)
        return {p.step for p in self._points.values() if p.kind == restore.CHECKPOINT and p.step >= base}

    def _base(self, tau: int) -> int:
        """The restore point the window ``[tau - window, tau)`` replays from."""
        start = max(0, tau - self.settings.window)
        best = restore.pick(self._points.values(), start, self._event_steps, self._barriers)
        if best is not None:
            return best.step
        return min((p.step for p in self._points.values()), default=0)

    def _prune_points(self, tau: int) -> None:
        base = self._base(tau)
        for key in [k for k, p in self._points.items() if p.step < base]:
            del self._points[key]

    def _restore_json(self) -> list[dict[str, Any]]:
        pts = sorted(self._points.values(), key=lambda p: (p.step, p.kind))
        return [p.to_json(self.log_dir) for p in pts]

    # ------------------------------------------------------------- events
    def on_unlearn_event(self, event: dict[str, Any]) -> None:
        ev = _json_safe(dict(event))
        step = int(ev["step"])
        if ev.get("ids") and self.engine is not None:
            path = layout.anchor_dir(self.log_dir, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_anchor(self.engine, path, ev)
            self._points[(step, restore.ANCHOR)] = restore.RestorePoint(step, path.resolve(), restore.ANCHOR,
                                                                        files=ckpt.read_checksums(path))
            ev["anchor"] = str(path.relative_to(self.log_dir))
            if step not in self._event_steps:
                self._event_steps.append(step)
        if self.writer is not None:
            self._put(EventItem(ev))

    # ---------------------------------------------------------- helpers
    def _collate_ids(self, ids: list[int]) -> dict[str, torch.Tensor]:
        e = self.engine
        return e.collator([e.dataset[i] for i in ids])

    def open_log(self):
        """The live log as a reader sees it, after a synchronous flush."""
        from .reader import TrajectoryLog

        self.flush(wait=True)
        return TrajectoryLog(self.log_dir)


def save_anchor(engine, path: Path, event: dict[str, Any]) -> None:
    """The exact state after an online correction (``anchors/step-<t>``). Plain
    parameters: the main rank writes; sharded (FSDP): every rank writes its part."""
    ckpt.save_checkpoint(path, engine.trainable(), engine.optimizer, engine.scheduler,
                         {"step": int(event["step"]), "kind": "anchor", "request_id": event.get("request_id")},
                         ckpt.Ranks.of(engine.accelerator))


class FollowerRecorder(NullRecorder):
    """What ranks other than the main one get: records nothing, but asks for the
    same checkpoints as the main rank's :class:`TrainingLogger`, knows where
    that log is (an online request makes every rank read it: ``log_dir``, a
    filesystem shared by the ranks) and writes its part of a sharded anchor.

    Why: ``Trainer.save_checkpoint`` ends with a barrier, so every rank must
    decide to checkpoint at the same steps or the run deadlocks.
    """

    def __init__(self, config: Any, log_dir: str | Path | None = None):
        self.settings = config if isinstance(config, RecorderSettings) else resolve_settings(config)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.engine = None

    def on_train_begin(self, engine, meta: dict[str, Any], resume_step: int) -> None:
        self.engine = engine

    def wants_checkpoint(self, step: int) -> bool:
        return step % self.settings.checkpoint_interval == 0

    def flush(self, wait: bool = True, **_: Any) -> None:
        """The main rank writes the log; the online unlearner waits for it with a barrier."""

    def on_unlearn_event(self, event: dict[str, Any]) -> None:
        if event.get("ids") and self.engine is not None and any(
                dist_utils.is_sharded(p) for p in self.engine.trainable().values()):
            save_anchor(self.engine, layout.anchor_dir(self.log_dir, int(event["step"])), event)


def _barriers(meta: dict[str, Any]) -> list[int]:
    """Resume steps at which the step budget (hence the LR schedule) changed."""
    out, prev = [], int(meta.get("total_steps", 0))
    for r in meta.get("resumes", []):
        total = int(r.get("total_steps", prev))
        if total != prev:
            out.append(int(r["step"]))
        prev = total
    return out


def _json_safe(x: Any) -> Any:
    """JSON-able copy (tensors -> lists, unknown objects -> str): events and hparams come from elsewhere."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
