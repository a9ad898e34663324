"""The background thread that turns step records into files.

Why a thread: the training step must not wait on disk I/O. The training
thread only collects Python objects (and, in heavy/diag mode, tensors it
already copied) and hands them over once per flush, so this thread wakes up
(and competes for the GIL) once per ``save_interval`` steps, not per step;
serialising, checksumming, computing update vectors and writing happen here. Every ``save_interval`` steps (and at checkpoints and at
the end) the thread *flushes*, in an order that makes ``steps.jsonl`` the
commit point::

    tensor shard (tmp + rename) -> events.jsonl -> sample_indices.jsonl
    -> steps.jsonl -> checkpoints.json, batch_index.json (tmp + rename) [-> fsync]

so after ``kill -9`` everything a committed step refers to is on disk (the
page cache survives a killed process), and whatever lies beyond the last
committed step is a reported torn tail. ``RecorderSettings.fsync`` (off by
default, like the trainer's checkpoints) adds durability against power loss
after the data is written, without making a waiting training thread wait.
The queue is bounded (a few flushes): if the disk cannot keep up (heavy
mode on a slow disk), training slows down instead of using unbounded memory.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import layout
from .jsonl import encode_line, rewrite_lines, scan, seal, write_bytes_atomic, write_json_atomic
from .settings import RecorderSettings
from .shards import write_shard
from .types import StepRecord
from .updates import encode_update

log = logging.getLogger("lmcleaner.trajectory")


@dataclass
class StepItem:
    record: StepRecord
    before: dict[str, torch.Tensor] | None = None  # theta_t (heavy)
    after: dict[str, torch.Tensor] | None = None  # theta_{t+1} (heavy)
    batches: list[dict[str, torch.Tensor]] | None = None  # global collated micro-batches (heavy)
    diag: dict[str, torch.Tensor] | None = None  # finished estimate (hutchinson)
    grads: dict[str, torch.Tensor] | None = None  # unclipped gradient copy (empirical Fisher)


@dataclass
class EventItem:
    event: dict[str, Any]


@dataclass
class FlushItem:
    restore_points: list[dict[str, Any]]
    retain_from: int
    closed: bool = False
    done: threading.Event | None = None


_STOP = object()


@dataclass
class WriterStats:
    flushes: int = 0
    busy_seconds: float = 0.0
    bytes_written: dict[str, int] = field(default_factory=dict)


def kept_micro_batches(record: StepRecord) -> list[list[int]]:
    """The ids each micro-batch actually trained on (the record keeps the planned ones)."""
    if not record.excluded:
        return [list(mb) for mb in record.micro_batches]
    ex = set(record.excluded)
    return [[i for i in mb if i not in ex] for mb in record.micro_batches]


def record_to_json(record: StepRecord, save_rng_state: bool = True) -> dict[str, Any]:
    """``StepRecord.to_json()`` without ``dataclasses.asdict``'s deep copy (it held the GIL
    for ~75 us per step on the writer thread, time the training thread waited for)."""
    r = record
    return {"step": r.step, "epoch": r.epoch, "micro_batches": r.micro_batches, "lrs": r.lrs,
            "normaliser": r.normaliser, "loss": r.loss, "grad_norm": r.grad_norm, "clipped": r.clipped,
            "rng_seed": r.rng_seed if save_rng_state else None, "excluded": r.excluded}


class LogWriter(threading.Thread):
    """Owns every file of the log except ``meta.json`` and the anchors' contents."""

    def __init__(self, log_dir: Path, settings: RecorderSettings, first_step: int, retained_from: int,
                 batch_index: dict[int, list[list[int]]], status: dict[str, Any],
                 collate_ids: Callable[[list[int]], dict[str, torch.Tensor]] | None = None):
        super().__init__(name="lmcleaner-trajectory-writer", daemon=True)
        self.log_dir = log_dir
        self.s = settings
        self.queue: queue.Queue = queue.Queue(maxsize=4)  # flushes handed over but not yet written
        self.collate_ids = collate_ids
        self.committed_step = first_step - 1  # last step durable on disk
        self.retained_from = retained_from
        self.batch_index: dict[int, list[list[int]]] = {}
        self._index_parts: dict[int, str] = {}  # step -> its encoded part of batch_index.json
        for t in sorted(batch_index):
            self._index_entry(t, batch_index[t])
        self.status = dict(status)
        self.error: BaseException | None = None
        self.stats = WriterStats()
        self._lines: dict[str, list[bytes]] = {layout.STEPS: [], layout.SAMPLES: [], layout.EVENTS: []}
        self._tensors: dict[str, torch.Tensor] = {}
        self._pending: list[int] = []
        self._file_first_step = min(batch_index) if batch_index else first_step
        self._files: dict[str, Any] = {}  # open append handles of the JSONL files
        self._written_points: list[dict[str, Any]] | None = None

    # ---------------------------------------------------------------- thread
    def run(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is _STOP:
                self.close_files()
                return
            t0 = time.perf_counter()
            for item in batch if isinstance(batch, list) else [batch]:
                try:
                    if self.error is None:
                        self._handle(item)
                except BaseException as err:  # reported on the training thread
                    self.error = err
                    log.error("training log writer failed: %s", err)
                finally:
                    if isinstance(item, FlushItem) and item.done is not None:
                        item.done.set()
            self.stats.busy_seconds += time.perf_counter() - t0

    def _handle(self, item: Any) -> None:
        if isinstance(item, StepItem):
            self._add_step(item)
        elif isinstance(item, EventItem):
            self._lines[layout.EVENTS].append(encode_line(item.event))
        elif isinstance(item, FlushItem):
            self._flush(item)

    # ------------------------------------------------------------- encoding
    def _add_step(self, item: StepItem) -> None:
        rec = item.record
        t = rec.step
        self._lines[layout.STEPS].append(encode_line(record_to_json(rec, self.s.save_rng_state)))
        kept = kept_micro_batches(rec)
        samples = self._lines[layout.SAMPLES]
        for m, ids in enumerate(kept):
            for pos, i in enumerate(ids):
                samples.append(seal(b'{"id":%d,"step":%d,"mb":%d,"pos":%d}' % (i, t, m, pos)))
        self._index_entry(t, rec.micro_batches)
        dtype = self.s.torch_dtype
        if item.before is not None and item.after is not None:
            for n, a in item.before.items():
                u, pi, pv = encode_update(a, item.after[n], dtype, self.s.exact_updates)
                self._tensors[layout.tensor_key(layout.UPDATE, t, n)] = u
                if pi is not None:
                    self._tensors[layout.tensor_key(layout.PATCH_INDEX, t, n)] = pi
                    self._tensors[layout.tensor_key(layout.PATCH_VALUE, t, n)] = pv
        if item.batches is not None:
            for m, b in enumerate(self._global_batches(kept, item.batches)):
                for k, v in b.items():
                    self._tensors[layout.batch_key(t, m, k)] = v.detach().cpu().contiguous()
        diag = item.diag
        if diag is None and item.grads is not None:
            from .curvature import empirical_fisher_diag

            diag = empirical_fisher_diag(item.grads)
        if diag is not None:
            for n, v in diag.items():
                self._tensors[layout.tensor_key(layout.DIAG, t, n)] = v.detach().cpu().to(dtype).contiguous()
        self._pending.append(t)

    def _index_entry(self, step: int, micro_batches: list[list[int]]) -> None:
        self.batch_index[step] = micro_batches
        self._index_parts[step] = f'"{step}":' + json.dumps(micro_batches, separators=(",", ":"))

    def _global_batches(self, kept: list[list[int]], mine: list[dict[str, torch.Tensor]]) -> list[dict]:
        """All ranks' micro-batches; the recording rank's are the tensors the step used."""
        if len(mine) == len(kept):
            return mine
        ws = max(1, len(kept) // max(1, len(mine)))
        out = []
        for j, ids in enumerate(kept):
            if j % ws == 0 and j // ws < len(mine):
                out.append(mine[j // ws])
            elif self.collate_ids is not None:
                out.append(self.collate_ids(ids))
        return out

    # ---------------------------------------------------------------- flush
    def _flush(self, item: FlushItem) -> None:
        touched: list[Path] = []
        if self._pending:
            first, last = self._pending[0], self._pending[-1]
            if self._tensors:
                tdir = self.log_dir / layout.TENSORS_DIR
                tdir.mkdir(exist_ok=True)
                path = tdir / layout.shard_name(first, last)
                self._count(layout.TENSORS_DIR, write_shard(path, self._tensors, first, last))
                touched.append(path)
                self._tensors = {}
        for name in (layout.EVENTS, layout.SAMPLES, layout.STEPS):  # steps.jsonl last: the commit point
            if self._lines[name]:
                data = b"".join(self._lines[name])
                f = self._handle_for(name)
                f.write(data)
                f.flush()
                touched.append(self.log_dir / name)
                self._count(name, len(data))
                self._lines[name] = []
        if self._pending:
            self.committed_step = self._pending[-1]
            self._pending = []
        self._prune(item.retain_from, item.restore_points)
        self.status.update({"closed": item.closed, "last_step": self.committed_step,
                            "first_step": min(self.batch_index) if self.batch_index else None,
                            "updated": time.time()})
        if item.restore_points != self._written_points:  # they change only at checkpoints
            write_json_atomic(self.log_dir / layout.CHECKPOINTS,
                              {"format_version": layout.FORMAT_VERSION, "restore_points": item.restore_points},
                              fsync=False)
            self._written_points = item.restore_points
            touched.append(self.log_dir / layout.CHECKPOINTS)
        # The whole document is rewritten at each flush; each step's part is encoded once.
        head = json.dumps({**self.status, "format_version": layout.FORMAT_VERSION}, separators=(",", ":"))
        doc = head[:-1] + ',"batches":{' + ",".join(self._index_parts.values()) + "}}"
        write_bytes_atomic(self.log_dir / layout.BATCH_INDEX, doc.encode(), fsync=False)
        touched.append(self.log_dir / layout.BATCH_INDEX)
        self.stats.flushes += 1
        # Written (kill -9 safe: the data is in the page cache). A waiting training
        # thread may go on; durability against power loss (opt-in fsync) follows here.
        if item.done is not None:
            item.done.set()
        if self.s.fsync:
            for p in dict.fromkeys(touched):
                _fsync_path(p)
        if item.closed:
            self.close_files()

    def _handle_for(self, name: str):
        """Append handles stay open between flushes: one write syscall per file per flush
        (every syscall is a GIL hand-off the training thread pays for)."""
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self.log_dir / name, "ab")
        return f

    def close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def _count(self, name: str, n: int) -> None:
        self.stats.bytes_written[name] = self.stats.bytes_written.get(name, 0) + n

    def _prune(self, base: int, restore_points: list[dict[str, Any]]) -> None:
        """Drop what lies before the window's restore point ``base``."""
        if base <= self.retained_from:
            return
        self.retained_from = base
        for t in [t for t in self.batch_index if t < base]:
            del self.batch_index[t]
            self._index_parts.pop(t, None)
        tdir = self.log_dir / layout.TENSORS_DIR
        if tdir.is_dir():
            for p in tdir.iterdir():
                rng = layout.parse_shard_name(p.name)
                if rng is not None and rng[1] < base:
                    p.unlink(missing_ok=True)
        keep_anchors = {int(rp["step"]) for rp in restore_points if rp.get("kind") == "anchor"}
        adir = self.log_dir / layout.ANCHORS_DIR
        if adir.is_dir():
            for p in adir.iterdir():
                step = p.name.removeprefix("step-")
                if step.isdigit() and int(step) < base and int(step) not in keep_anchors:
                    shutil.rmtree(p, ignore_errors=True)
        # Compact the JSONL files once the pruned prefix is as long as what is kept
        # (amortised O(1) rewriting per step; each rewrite is atomic).
        if base - self._file_first_step >= max(self.committed_step + 1 - base, self.s.save_interval):
            self.close_files()  # the files are replaced; reopen on the next append
            for name in (layout.SAMPLES, layout.STEPS):
                path = self.log_dir / name
                res = scan(path)
                rewrite_lines(path, [encode_line(e) for e in res.entries if int(e["step"]) >= base], fsync=False)
            self._file_first_step = base


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
