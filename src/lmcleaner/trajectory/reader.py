"""``TrajectoryLog``: open, validate and query a training log.

Why strict by default: a torn or corrupted tail must never be used silently
(DESIGN §2). ``TrajectoryLog(dir)`` raises a one-line
:class:`TrajectoryLogError` naming the file and the last valid step;
``TrajectoryLog(dir, tolerant=True)`` opens the valid prefix instead and
describes what it left out in :attr:`tail`.

``steps.jsonl`` is the commit log: a step exists iff its checksummed line is
in the intact prefix. Everything else is checked against it.

Torn versus corrupted: a crash only tears the *end* of an append-only file.
A bad line followed by intact ones is damage in the middle (disk, editing,
tampering) and is reported as such; ``tolerant=True`` still stops there but
says how many intact steps it leaves out.

A received log is data: ``meta.json`` is checked for the keys and types the
reader needs (a one-line error naming the key otherwise), and checkpoints
must belong to the log (their ``checksums.json`` equals the hashes recorded
in ``checkpoints.json``; the files themselves are hashed when loaded).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import layout, restore
from .jsonl import TrajectoryLogError, read_json, scan
from .restore import RestorePoint
from .shards import check_header, read_shard
from .types import OptimizerSpec, StepRecord
from .updates import apply_update
from .writer import kept_micro_batches


@dataclass
class TailProblem:
    """Something beyond the valid prefix (or inconsistent) in one file.

    ``kind``: ``torn`` (the end of a file, as a crash leaves it), ``corrupt``
    (damage followed by intact data) or ``inconsistent`` (files disagree)."""

    file: str
    message: str
    torn_bytes: int = 0
    line: int | None = None
    kind: str = "torn"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "message": self.message, "torn_bytes": self.torn_bytes, "line": self.line,
                "kind": self.kind}


@dataclass
class TailReport:
    """What opening the log found at its end."""

    last_valid_step: int | None
    closed: bool  # the recorder closed the log (no crash)
    problems: list[TailProblem] = field(default_factory=list)

    @property
    def torn(self) -> bool:
        return bool(self.problems)

    @property
    def torn_bytes(self) -> int:
        return sum(p.torn_bytes for p in self.problems)

    @property
    def corrupt(self) -> bool:
        """Damage that a crash cannot explain (intact data after a bad line, mismatching files)."""
        return any(p.kind != "torn" for p in self.problems)

    def describe(self) -> str:
        if not self.problems:
            return "clean" + ("" if self.closed else " (log not closed: the run is live or was killed between flushes)")
        return "; ".join(f"{p.file}: {p.message}" for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {"last_valid_step": self.last_valid_step, "closed": self.closed, "torn": self.torn,
                "corrupt": self.corrupt, "torn_bytes": self.torn_bytes,
                "problems": [p.to_json() for p in self.problems]}


@dataclass(frozen=True)
class SampleUse:
    """Sample ``id`` trained at ``step`` in global micro-batch ``micro_batch``, row ``position``
    of that micro-batch's collated tensors (excluded ids do not occupy rows)."""

    step: int
    micro_batch: int
    position: int


class TrajectoryLog:
    """A recorded training trajectory (see ``layout`` for the files)."""

    def __init__(self, log_dir: str | Path, tolerant: bool = False):
        self.log_dir = Path(log_dir)
        self.tolerant = tolerant
        if not (self.log_dir / layout.META).is_file():
            raise TrajectoryLogError(f"{self.log_dir}: not a training log (no {layout.META}); "
                                     "record one with training_logger.enabled=true")
        self.meta: dict[str, Any] = _checked_meta(self.log_dir / layout.META, read_json(self.log_dir / layout.META))
        self.optimizer_spec  # noqa: B018 - a malformed recorded optimizer is refused at open
        self._problems: list[TailProblem] = []
        try:
            self._load_steps()
            self._load_events()
            self._load_samples()
            self._load_shards()
            self._load_index()
            self._load_restore_points()
        except (KeyError, TypeError, AttributeError, IndexError) as err:
            # checksummed lines that parse but lack fields: written by something else than lmcleaner
            raise TrajectoryLogError(f"{self.log_dir}: malformed log entry ({type(err).__name__}: {err}); the log "
                                     "is damaged or was not written by lmcleaner") from None
        self.tail = TailReport(self.last_step, bool(self._status.get("closed")), self._problems)

    # ------------------------------------------------------------- loading
    def _problem(self, file: str, message: str, torn_bytes: int = 0, line: int | None = None,
                 kind: str = "torn") -> None:
        last = self.last_step if hasattr(self, "_records") else None
        if not self.tolerant:
            where = f"last valid step {last}" if last is not None else "no valid step"
            raise TrajectoryLogError(f"{self.log_dir / file}: {message} ({where}); open with tolerant=True "
                                     "(lmcleaner inspect --tolerant) to use the valid prefix")
        self._problems.append(TailProblem(file, message, torn_bytes, line, kind))

    @staticmethod
    def _damage(res, what: str) -> tuple[str, str]:
        """(message, kind) for the bad region of a scanned JSONL file."""
        if res.corrupt:
            return (f"line {res.bad_line} is corrupted and {res.intact_after} intact line(s) follow it: the file "
                    f"was damaged in the middle, not torn by a crash; {what} after line {res.bad_line - 1} "
                    f"(including those {res.intact_after} intact one(s)) are NOT used", "corrupt")
        return (f"torn or corrupted tail at line {res.bad_line} ({res.torn_bytes} bytes after byte "
                f"{res.valid_bytes})", "torn")

    def _load_steps(self) -> None:
        res = scan(self.log_dir / layout.STEPS)
        if not (self.log_dir / layout.STEPS).exists():
            raise TrajectoryLogError(f"{self.log_dir / layout.STEPS}: missing")
        records: list[StepRecord] = []
        cut_line = None
        for k, e in enumerate(res.entries):
            try:
                rec = StepRecord.from_json({f: e[f] for f in StepRecord.__dataclass_fields__ if f in e})
            except TypeError as err:
                cut_line = k + 1
                self._records = records
                self._problem(layout.STEPS, f"line {k + 1} is not a step record ({err})", line=k + 1,
                              kind="corrupt")
                break
            if records and rec.step != records[-1].step + 1:
                self._records = records
                self._problem(layout.STEPS, f"step {rec.step} follows step {records[-1].step} at line {k + 1}",
                              line=k + 1, kind="corrupt")
                cut_line = k + 1
                break
            if rec.rng_seed is None:
                from ..train.engine import step_seed

                rec.rng_seed = step_seed(int(self.meta.get("seed", 0)), rec.step, 0)
            records.append(rec)
        self._records = records
        if res.torn_bytes and cut_line is None:
            message, kind = self._damage(res, "the steps")
            self._problem(layout.STEPS, message, res.torn_bytes, res.bad_line, kind)
        self._by_step = {r.step: r for r in records}

    def _load_events(self) -> None:
        res = scan(self.log_dir / layout.EVENTS)
        last = self.last_step if self.last_step is not None else -1
        self._events = [e for e in res.entries if int(e.get("step", -1)) <= last]
        beyond = len(res.entries) - len(self._events)
        if res.corrupt:
            self._problem(layout.EVENTS, self._damage(res, "the events")[0], res.torn_bytes, res.bad_line, "corrupt")
        elif res.torn_bytes or beyond:
            self._problem(layout.EVENTS, f"{beyond} uncommitted event(s) and {res.torn_bytes} torn bytes after the "
                                         f"last committed step", res.torn_bytes, res.bad_line)

    def _load_samples(self) -> None:
        res = scan(self.log_dir / layout.SAMPLES)
        last = self.last_step if self.last_step is not None else -1
        first = self.first_step if self.first_step is not None else 0
        uses: dict[int, list[SampleUse]] = defaultdict(list)
        seen: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        beyond = 0
        for e in res.entries:
            t = int(e["step"])
            if t > last:
                beyond += 1
                continue
            if t < first:
                continue  # pruned with the window
            uses[int(e["id"])].append(SampleUse(t, int(e["mb"]), int(e["pos"])))
            seen[t].append((int(e["id"]), int(e["mb"]), int(e["pos"])))
        if res.corrupt:
            self._problem(layout.SAMPLES, self._damage(res, "the sample uses")[0], res.torn_bytes, res.bad_line,
                          "corrupt")
        elif res.torn_bytes or beyond:
            self._problem(layout.SAMPLES, f"{beyond} uncommitted line(s) and {res.torn_bytes} torn bytes after the "
                                          "last committed step", res.torn_bytes, res.bad_line)
        for r in self._records:
            want = [(i, m, p) for m, ids in enumerate(kept_micro_batches(r)) for p, i in enumerate(ids)]
            if seen.get(r.step, []) != want:
                self._problem(layout.SAMPLES, f"entries for step {r.step} disagree with {layout.STEPS}",
                              kind="inconsistent")
                break
        self._uses = dict(uses)

    def _load_shards(self) -> None:
        self._shards: list[tuple[int, int, Path]] = []
        self._shard_cache: dict[Path, dict[str, torch.Tensor]] = {}
        tdir = self.log_dir / layout.TENSORS_DIR
        last = self.last_step if self.last_step is not None else -1
        if tdir.is_dir():
            for p in sorted(tdir.iterdir()):
                rng = layout.parse_shard_name(p.name)
                if rng is None:
                    continue
                if rng[0] > last:
                    self._problem(layout.TENSORS_DIR, f"{p.name} holds uncommitted steps {rng[0]}..{rng[1]}",
                                  p.stat().st_size)
                    continue
                bad = check_header(p)
                if bad is not None:
                    self._problem(f"{layout.TENSORS_DIR}/{p.name}", f"damaged tensor shard ({bad})")
                    continue
                self._shards.append((rng[0], rng[1], p))
        s = self.meta.get("settings", {})
        self.has_updates = bool(s.get("store_updates"))
        self.has_batches = bool(s.get("store_batches"))
        self.has_diag = bool(s.get("diag_estimator"))
        if self.has_updates or self.has_batches or self.has_diag:
            covered = set()
            for a, b, _ in self._shards:
                covered.update(range(a, b + 1))
            missing = [r.step for r in self._records if r.step not in covered]
            if missing:
                cut = missing[0]
                self._problem(layout.TENSORS_DIR, f"no tensor shard holds step {cut}")
                self._truncate(cut)

    def _truncate(self, step: int) -> None:
        """Tolerant mode: use only the steps before ``step``."""
        self._records = [r for r in self._records if r.step < step]
        self._by_step = {r.step: r for r in self._records}
        self._events = [e for e in self._events if int(e["step"]) < step]
        self._uses = {i: [u for u in us if u.step < step] for i, us in self._uses.items()}

    def _load_index(self) -> None:
        path = self.log_dir / layout.BATCH_INDEX
        self._status: dict[str, Any] = {}
        if not path.exists():
            return
        try:
            doc = read_json(path)
        except TrajectoryLogError as err:
            self._problem(layout.BATCH_INDEX, str(err).split(": ", 1)[-1])
            return
        for k, mbs in doc.get("batches", {}).items():
            r = self._by_step.get(int(k))
            if r is not None and r.micro_batches != mbs:
                self._problem(layout.BATCH_INDEX, f"step {k} disagrees with {layout.STEPS}", kind="inconsistent")
                break
        self._status = doc
        if doc.get("closed") and doc.get("last_step") != self.last_step:
            self._status = {**doc, "closed": False}

    def _load_restore_points(self) -> None:
        points: dict[tuple[int, str], RestorePoint] = {}
        path = self.log_dir / layout.CHECKPOINTS
        if path.exists():
            try:
                doc = read_json(path)
            except TrajectoryLogError as err:
                self._problem(layout.CHECKPOINTS, str(err).split(": ", 1)[-1])
                doc = {}
            for d in doc.get("restore_points", []):
                p = RestorePoint.from_json(d, self.log_dir, self.run_dir)
                points[(p.step, p.kind)] = p
        from ..train.checkpoint import CheckpointError, list_checkpoints, read_checksums, read_trainer_state

        # A checkpoint written just before a crash may not be in the index yet.
        lo = self.first_step if self.first_step is not None else 0
        hi = (self.last_step + 1) if self.last_step is not None else lo
        for step, cpath in list_checkpoints(self.run_dir).items():
            if lo <= step <= hi and (step, restore.CHECKPOINT) not in points:
                try:
                    fp = read_trainer_state(cpath).get("dataset_fingerprint")
                    files = read_checksums(cpath)
                except CheckpointError:
                    continue
                if fp == self.meta.get("dataset_fingerprint"):
                    points[(step, restore.CHECKPOINT)] = RestorePoint(step, cpath.resolve(), files=files)
        self.all_restore_points = sorted(points.values(), key=lambda p: (p.step, p.kind))
        from ..train.checkpoint import has_params

        usable = []
        for p in self.all_restore_points:
            if not (has_params(p.path) and p.step <= hi):
                continue
            try:  # cheap: compares the hash tables; the files are hashed when loaded
                own = read_checksums(p.path)
            except CheckpointError as err:
                self._problem(layout.CHECKPOINTS, str(err), kind="inconsistent")
                continue
            if p.files and own is not None and own != p.files:
                self._problem(layout.CHECKPOINTS, f"{p.path} does not belong to this log (its {'checksums.json'} "
                                                  f"differs from the hashes recorded for step {p.step})",
                              kind="inconsistent")
                continue
            usable.append(p)
        self._points = usable
        self.missing_restore_points = [p for p in self.all_restore_points if p not in self._points]

    # ---------------------------------------------------------------- basics
    @property
    def steps(self) -> list[int]:
        return [r.step for r in self._records]

    @property
    def first_step(self) -> int | None:
        return self._records[0].step if self._records else None

    @property
    def last_step(self) -> int | None:
        return self._records[-1].step if self._records else None

    @property
    def end(self) -> int:
        """``tau``: one past the last recorded step (the number of completed steps)."""
        return self.last_step + 1 if self._records else (self.first_step or 0)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, step: int) -> bool:
        return step in self._by_step

    @property
    def run_dir(self) -> Path:
        """The training run this log belongs to (checkpoints, final model), as seen from the log
        directory: a copied run reads its own files, not the original's."""
        rel = self.meta.get("run_dir_relative")
        if isinstance(rel, str) and not Path(rel).is_absolute():  # a received log cannot point anywhere
            return Path(os.path.normpath(self.log_dir / rel))
        if self.log_dir.name == "training_log" or not self.meta.get("output_dir"):
            return self.log_dir.parent  # logs written before run_dir_relative, default layout
        return Path(self.meta["output_dir"])

    @property
    def storage(self) -> str:
        return self.meta["storage"]

    @property
    def mode(self) -> str:
        return self.meta.get("mode", "batch")

    @property
    def run_fingerprint(self) -> str:
        return self.meta["run_fingerprint"]

    @property
    def closed(self) -> bool:
        return self.tail.closed

    @property
    def optimizer_spec(self) -> OptimizerSpec:
        try:
            return OptimizerSpec.from_json(self.meta["optimizer"])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise TrajectoryLogError(f"{self.log_dir / layout.META}: malformed 'optimizer' ({type(err).__name__}: "
                                     f"{err}); the log is damaged or was not written by lmcleaner") from None

    def config(self):
        """The run's config as a typed OmegaConf object (to rebuild the trainer); a malformed
        recorded config is a one-line error naming ``meta.json`` and the key."""
        from ..config.received import merge_recorded

        try:
            return merge_recorded(self.meta["config"], str(self.log_dir / layout.META))
        except ValueError as err:
            raise TrajectoryLogError(str(err)) from None

    def lr_mass(self, a: int, b: int) -> float:
        """``sum eta_s`` over the recorded steps ``a .. b-1`` (first parameter group's applied
        rate): how far training moved in between. Prefix sums, built once."""
        if getattr(self, "_lr_prefix", None) is None:
            prefix, total = {}, 0.0
            for rec in self._records:
                prefix[rec.step] = total
                total += float(rec.lrs[0])
            self._lr_prefix, self._lr_total = prefix, total

        def at(step: int) -> float:
            return self._lr_prefix.get(step, self._lr_total)

        return at(b) - at(a) if b > a else 0.0

    def record(self, step: int) -> StepRecord:
        try:
            return self._by_step[step]
        except KeyError:
            raise TrajectoryLogError(f"{self.log_dir}: step {step} is not recorded "
                                     f"(recorded: {self.first_step}..{self.last_step})") from None

    def records(self, start: int | None = None, end: int | None = None) -> Iterator[StepRecord]:
        lo = self.first_step if start is None else start
        hi = self.end if end is None else end
        for r in self._records:
            if lo <= r.step < hi:
                yield r

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(self._events)

    @property
    def event_steps(self) -> list[int]:
        return sorted({int(e["step"]) for e in self._events if e.get("ids")})

    @property
    def schedule_segments(self) -> list[tuple[int, int]]:
        """``(first step, total steps the LR schedule was built for)``, one per (re)start."""
        segs = [(0, int(self.meta.get("total_steps", 0)))]
        for r in self.meta.get("resumes", []):
            if "total_steps" in r:
                segs = [s for s in segs if s[0] < int(r["step"])] + [(int(r["step"]), int(r["total_steps"]))]
        return segs

    def batch_plan(self):
        """The recorded run's batch plan (global batch of the *recorded* world size): which
        ids each step trained on, including steps pruned from the log."""
        from ..data import BatchPlan

        m = self.meta
        try:
            plan = BatchPlan(int(m["num_samples"]), int(m["batch_size"]), int(m["gradient_accumulation_steps"]),
                             int(m["world_size"]), int(m["seed"]))
        except (KeyError, TypeError, ValueError) as err:
            raise TrajectoryLogError(f"{self.log_dir / layout.META}: cannot rebuild the batch plan ({err}); the log "
                                     "is damaged or was not written by lmcleaner") from None
        for r in self._records[:1]:
            if plan.micro_batches(r.step) != r.micro_batches:
                raise TrajectoryLogError(f"{self.log_dir / layout.META}: the batch plan it describes does not "
                                         f"reproduce recorded step {r.step}; the log is damaged or was edited")
        return plan

    def total_steps_at(self, step: int) -> int:
        return [t for s, t in self.schedule_segments if s <= step][-1]

    @property
    def barrier_steps(self) -> list[int]:
        """Resume steps where the step budget changed (see ``restore``)."""
        segs = self.schedule_segments
        return [s for (s, t), (_, prev) in zip(segs[1:], segs[:-1]) if t != prev]

    # ------------------------------------------------------------- samples
    def sample_uses(self, sample_id: int) -> list[SampleUse]:
        """Where a sample was trained on (retained steps only), in step order."""
        return sorted(self._uses.get(int(sample_id), []), key=lambda u: (u.step, u.micro_batch, u.position))

    def steps_containing(self, sample_ids) -> list[int]:
        out: set[int] = set()
        for i in sample_ids:
            out.update(u.step for u in self._uses.get(int(i), []))
        return sorted(out)

    # ------------------------------------------------------ restore points
    @property
    def restore_points(self) -> list[RestorePoint]:
        """Restore points present on disk."""
        return list(self._points)

    def restore_point_for(self, step: int) -> RestorePoint:
        """The latest usable parameter+optimizer state at or before ``step``."""
        p = restore.pick(self._points, step, self.event_steps, self.barrier_steps)
        if p is None or (self.first_step is not None and p.step < self.first_step and p.step != step):
            raise TrajectoryLogError(
                f"{self.log_dir}: no checkpoint at or before step {step} within the recorded steps "
                f"{self.first_step}..{self.last_step} (window {self.window}); the step is outside the window")
        return p

    @property
    def window(self) -> tuple[int, int]:
        """``[lo, hi)``: the steps whose ``theta`` this log can reproduce exactly."""
        if not self._records:
            return (self.end, self.end)
        first = self.first_step
        starts = [p.step for p in self._points if p.step >= first]
        if not starts:
            return (self.end, self.end)
        return (min(starts), self.end)

    # ---------------------------------------------------- tensors (heavy/diag)
    def _shard_for(self, step: int) -> Path:
        for a, b, p in self._shards:
            if a <= step <= b:
                return p
        raise TrajectoryLogError(f"{self.log_dir / layout.TENSORS_DIR}: no shard holds step {step}")

    def _load_shard(self, path: Path) -> dict[str, torch.Tensor]:
        """Verified shard contents; the last two are cached (iteration touches each shard once)."""
        if path not in self._shard_cache:
            if len(self._shard_cache) >= 2:
                self._shard_cache.pop(next(iter(self._shard_cache)))
            self._shard_cache[path] = read_shard(path)
        return self._shard_cache[path]

    def _tensors(self, kind: str, step: int) -> dict[str, torch.Tensor]:
        self.record(step)
        shard = self._load_shard(self._shard_for(step))
        prefix = f"{kind}/{step}/"
        return {k[len(prefix):]: v for k, v in shard.items() if k.startswith(prefix)}

    def update(self, step: int) -> dict[str, torch.Tensor]:
        """``u_t = theta_{t+1} - theta_t`` (heavy mode), in the stored dtype."""
        self._need(self.has_updates, "update vectors", "heavy")
        return self._tensors(layout.UPDATE, step)

    def batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The collated micro-batches step ``step`` trained on (heavy mode / save_batch_data)."""
        self._need(self.has_batches, "batch tensors", "heavy")
        flat = self._tensors(layout.BATCH, step)
        out: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for k, v in flat.items():
            m, f = k.split("/", 1)
            out[int(m)][f] = v
        return [out[m] for m in sorted(out)]

    def diag(self, step: int) -> dict[str, torch.Tensor]:
        """Diagonal curvature estimate at ``theta_step`` (float32), see ``meta['diag_estimator']``."""
        self._need(self.has_diag, "diagonal curvature", "diag")
        return {n: v.float() for n, v in self._tensors(layout.DIAG, step).items()}

    def diag_provider(self) -> Callable[[int], dict[str, torch.Tensor]]:
        """``step -> {name: diag}``, the ``diag_provider`` of ``lmcleaner.unlearn``."""
        self._need(self.has_diag, "diagonal curvature", "diag")
        return self.diag

    def _need(self, ok: bool, what: str, storage: str) -> None:
        if not ok:
            raise TrajectoryLogError(f"{self.log_dir}: this log has no {what} (recorded with storage="
                                     f"{self.storage}); record with training_logger.storage={storage}")

    def params_at(self, step: int) -> dict[str, torch.Tensor]:
        """Heavy mode: exact ``theta_step`` from the restore point before it plus the
        recorded update vectors (no dataset, no replay)."""
        self._need(self.has_updates, "update vectors", "heavy")
        from ..train.checkpoint import load_params, verify_checkpoint

        if step != self.end:
            self.record(step)
        p = self.restore_point_for(step)
        verify_checkpoint(p.path, p.files)
        names = list(self.meta.get("param_shapes", {})) or None
        theta = load_params(p.path)
        if names is not None:
            theta = {n: theta[n] for n in names}
        for t in range(p.step, step):
            u = self._tensors(layout.UPDATE, t)
            pi = self._tensors(layout.PATCH_INDEX, t)
            pv = self._tensors(layout.PATCH_VALUE, t)
            theta = {n: apply_update(v, u[n], pi.get(n), pv.get(n)) for n, v in theta.items()}
        return theta

    def params_from(self, theta_tau: dict[str, torch.Tensor], tau: int, step: int) -> dict[str, torch.Tensor]:
        """Heavy mode: ``theta_step = theta_tau - sum_{t=step}^{tau-1} u_t`` (the sum in float64).

        Not bit-exact in general (float rounding); :meth:`params_at` is.
        """
        self._need(self.has_updates, "update vectors", "heavy")
        acc = {n: torch.zeros_like(v, dtype=torch.float64) for n, v in theta_tau.items()}
        for t in range(step, tau):
            u = self._tensors(layout.UPDATE, t)
            for n in acc:
                acc[n] += u[n].double()
        return {n: (theta_tau[n].double() - acc[n]).to(theta_tau[n].dtype) for n in theta_tau}

    # ------------------------------------------------------------- sizes
    def sizes(self) -> dict[str, Any]:
        """Bytes on disk: per-step files, fixed files, restore points (listed separately)."""
        per_step_files = [layout.STEPS, layout.SAMPLES, layout.EVENTS, layout.BATCH_INDEX]
        files = {name: _size(self.log_dir / name) for name in per_step_files}
        files[layout.TENSORS_DIR] = sum(_size(p) for _, _, p in self._shards)
        fixed = {name: _size(self.log_dir / name) for name in (layout.META, layout.CHECKPOINTS)}
        n = max(len(self._records), 1)
        log_bytes = sum(files.values())
        ckpts = {p.step: {"kind": p.kind, "path": str(p.path), "bytes": _dir_size(p.path)} for p in self._points}
        return {"steps": len(self._records), "per_step_files": files, "log_bytes": log_bytes,
                "bytes_per_step": log_bytes / n, "fixed_files": fixed, "restore_points": ckpts,
                "restore_point_bytes": sum(c["bytes"] for c in ckpts.values())}


# What the reader needs from meta.json, and its JSON type (a received log is checked, never trusted).
_META_KEYS: dict[str, tuple[type, ...]] = {
    "config": (dict,), "optimizer": (dict,), "storage": (str,), "run_fingerprint": (str,),
    "dataset_fingerprint": (str,), "model_fingerprint": (str,), "seed": (int,), "world_size": (int,),
    "total_steps": (int,),
}
_META_OPTIONAL: dict[str, tuple[type, ...]] = {
    "settings": (dict,), "resumes": (list,), "output_dir": (str,), "run_dir_relative": (str,),
    "torch_num_threads": (int, type(None)), "mode": (str,), "window": (int,), "param_shapes": (dict,),
    "batch_size": (int,), "gradient_accumulation_steps": (int,), "num_samples": (int,),
}


def _checked_meta(path: Path, meta: Any) -> dict[str, Any]:
    """``meta.json`` with the keys and types the reader relies on, else a one-line error naming the key."""
    damaged = "the log is damaged or was not written by lmcleaner"
    if not isinstance(meta, dict):
        raise TrajectoryLogError(f"{path}: expected a JSON object, got {type(meta).__name__}; {damaged}")
    version = meta.get("format_version")
    if version != layout.FORMAT_VERSION:
        raise TrajectoryLogError(f"{path}: format version {version} is not supported "
                                 f"(this lmcleaner reads version {layout.FORMAT_VERSION})")
    for key, types in (*_META_KEYS.items(), *_META_OPTIONAL.items()):
        if key not in meta:
            if key in _META_KEYS:
                raise TrajectoryLogError(f"{path}: key '{key}' is missing; {damaged}")
            continue
        value = meta[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join(t.__name__ for t in types)
            raise TrajectoryLogError(f"{path}: key '{key}' must be {want}, got {type(value).__name__}; {damaged}")
    if meta["storage"] not in ("light", "heavy", "diag"):
        raise TrajectoryLogError(f"{path}: key 'storage' is '{meta['storage']}', expected light, heavy or diag; "
                                 f"{damaged}")
    for r in meta.get("resumes", []):
        if not (isinstance(r, dict) and isinstance(r.get("step"), int)):
            raise TrajectoryLogError(f"{path}: key 'resumes' holds an entry without an integer 'step'; {damaged}")
    return meta


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _dir_size(p: Path) -> int:
    if not p.is_dir():
        return 0
    return sum(_size(f) for f in p.rglob("*") if f.is_file())
