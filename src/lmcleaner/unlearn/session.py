"""An unlearning session over one trained run: open, check, compute, write.

``UnlearnSession(run_dir)`` opens the run's trajectory log, rebuilds the exact
training engine from the recorded config, checks the fingerprints of model
and data, and resolves deletion requests to sample ids and steps.
``session.run(method, ids, **args)`` computes the unlearned state *without
writing*; ``session.save(result, out_dir)`` writes a ``from_pretrained``
directory atomically and appends the audit record. The source run is never
modified.

Guarantees (``README: Guarantees``):

- no partial forgetting: an id with *any* use the log cannot replay (before
  the window) is refused, naming its earliest use and the window;
- the run is data: its recorded ``trust_remote_code`` and telemetry YAML are
  ignored; only ``trust_remote_code=True`` from the caller lets the model run
  its own code;
- the output never lands on the source: it may not be the run, contain it,
  or lie inside it (except the fresh default ``<run>/unlearned-<method>``),
  nor exist already (unless ``overwrite``); it is written in a temporary
  directory outside the run, audit included, and renamed into place; the
  audit of a replaced output is carried over (append-only).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..train.export import write_model_files
from ..train.outputs import AtomicDir, check_output, fresh_child, is_within, resolved, save_tensors
from ..train.trainer import model_fingerprint
from .audit import append_audit_record, new_request_id, read_audit_records, weights_fingerprint
from .forget_set import ForgetSetError, resolve_forget_ids, validate_ids
from .grad_ascent import grad_ascent
from .methods import LMCleanerBatchLevel, LMCleanerSampleLevel, Rollback, SGDFormula, apply_correction

METHODS = ("LMCleanerBatchLevel", "LMCleanerSampleLevel", "replay", "rollback", "sgd_formula", "GradAscent")
_ALIASES = {"LMCleanerBatch": "LMCleanerBatchLevel", "LMCleanerSample": "LMCleanerSampleLevel",
            "Replay": "replay", "Rollback": "rollback", "SGDFormula": "sgd_formula", "grad_ascent": "GradAscent"}


@contextmanager
def recorded_threads(n: int | None):
    """Run with the intra-op thread count training used (CPU bit-exact replay)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


log = logging.getLogger("lmcleaner.unlearn")
GUARD_ROWS = 32
GUARD_TOLERANCE = 0.25  # relative retain-loss increase flagged as a diverged correction


class UnlearnError(ValueError):
    """A one-line problem with an unlearning request (bad ids, window, fingerprints)."""


def canonical_method(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in METHODS:
        raise UnlearnError(f"unknown unlearning method '{name}': choose one of {list(METHODS)}")
    return name


@dataclass
class UnlearnResult:
    method: str
    forget_ids: list[int]
    tau: int
    params: dict[str, torch.Tensor]  # the unlearned trainable parameters at tau
    opt_state: dict[str, dict[str, torch.Tensor]] | None  # corrected optimizer state (None: not corrected)
    info: dict[str, Any] = field(default_factory=dict)  # cost, norms, steps, settings (JSON-able)


def find_log_dir(run_dir: Path) -> Path:
    for cand in (run_dir / "training_log", run_dir):
        if (cand / "meta.json").is_file():
            return cand
    raise UnlearnError(f"no trajectory log in {run_dir}: train with training_logger.enabled=true "
                       "or set trainer.method_args.training_log_dir")


class UnlearnSession:
    def __init__(self, run_dir: str | Path | None = None, log_dir: str | Path | None = None,
                 trust_remote_code: bool = False):
        from ..trajectory import TrajectoryLog, TrajectoryReplayer

        if run_dir is None and log_dir is None:
            raise UnlearnError("give the trained run (unlearn.model_dir=...) or trainer.method_args.training_log_dir")
        if run_dir is not None and not Path(run_dir).is_dir():
            raise UnlearnError(f"unlearn.model_dir={run_dir}: no such directory (give a trained run)")
        self.log_dir = Path(log_dir) if log_dir else find_log_dir(Path(run_dir))
        if not (self.log_dir / "meta.json").is_file():
            raise UnlearnError(f"no trajectory log at {self.log_dir} (meta.json missing)")
        self.log = TrajectoryLog(self.log_dir)
        # trust_remote_code is the caller's (the current user's) decision, never the run's
        self.replayer = TrajectoryReplayer(self.log, trust_remote_code=trust_remote_code)
        self.trainer = self.replayer.trainer
        meta = self.log.meta
        self.run_dir = Path(run_dir) if run_dir else self.log.run_dir
        if meta.get("dataset_fingerprint") != self.trainer.dataset.fingerprint:
            raise UnlearnError(f"dataset fingerprint mismatch: the log at {self.log_dir} was recorded on other data "
                               "(same dataset, tokenizer and max_length are required)")
        if meta.get("model_fingerprint") != model_fingerprint(self.trainer.engine.trainable()):
            raise UnlearnError(f"model fingerprint mismatch: the log at {self.log_dir} belongs to another "
                               "model/LoRA setup")
        self.tau = self.log.end
        self.spec = self.log.optimizer_spec
        # The methods evaluate losses functionally; give them their own module so
        # replay (which mutates the engine's parameters) cannot interfere.
        self.template = copy.deepcopy(self.trainer.engine.unwrapped)

    # ------------------------------------------------------------ requests
    def resolve(self, forget: Any) -> list[int]:
        ids = resolve_forget_ids(forget, self.trainer.dataset.records)
        validate_ids(ids, len(self.trainer.dataset))
        return ids

    def split_used(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """(ids used in a recorded step, ids never used).

        An id with *any* use before the replayable window is refused, even when
        it was also used inside it: removing only the in-window uses would
        return a model that still learned from it while claiming it forgot."""
        lo, hi = self.log.window
        wanted = set(ids)
        early = self.earliest_uses_before(wanted, lo)
        if early:
            first = min(early, key=lambda i: (early[i], i))
            raise UnlearnError(
                f"samples {sorted(early)[:5]} were used before the replayable window (steps {lo}..{hi - 1}); "
                f"earliest use: sample {first} at step {early[first]}: they cannot be fully unlearned from this log; "
                "record a longer window (training_logger.max_steps) or use exact retraining (lmcleaner retrain)")
        steps = self.log.steps_containing(ids)
        used = {i for s in steps if s >= lo for i in self.log.record(s).sample_ids} & wanted
        return sorted(used), sorted(wanted - used)

    def steps_for(self, ids: list[int]) -> list[int]:
        used, unused = self.split_used(ids)
        if not used:
            raise UnlearnError(f"samples {unused[:5]} were never used in a recorded training step: nothing to forget")
        lo, _ = self.log.window
        return [s for s in self.log.steps_containing(used) if s >= lo]

    def earliest_uses_before(self, ids: set[int], lo: int) -> dict[int, int]:
        """``{id: first step < lo that trained on it}``. Retained steps say what each step
        really used; pruned ones (before the log's first step) come from the batch plan,
        a pure function of (seed, epoch), minus the ids excluded at that time."""
        found: dict[int, int] = {}
        first = self.log.first_step if self.log.first_step is not None else lo
        for rec in self.log.records(first, lo):
            dropped = set(rec.excluded)
            for i in rec.sample_ids:
                if i in ids and i not in found and i not in dropped:
                    found[i] = rec.step
        pruned_end = min(first, lo)
        if not ids or pruned_end <= 0:
            return found
        plan = self.log.batch_plan()
        excluded_from = {int(i): 0 for i in self.trainer.t.exclude_ids}
        for ev in self.log.events:
            for i in ev.get("ids") or []:
                excluded_from.setdefault(int(i), int(ev["step"]))
        gb, spe = plan.global_batch, plan.steps_per_epoch
        for epoch in range((pruned_end - 1) // spe + 1):
            n = min(spe, pruned_end - epoch * spe)
            for pos, i in enumerate(plan.epoch_order(epoch)[: n * gb]):
                step = epoch * spe + pos // gb
                if i in ids and step < excluded_from.get(i, step + 1) and step < found.get(i, step + 1):
                    found[i] = step
        return found

    # ---------------------------------------------------------------- run
    def run(self, method: str, ids: list[int], fallback_to_replay: bool = False, **kwargs: Any) -> UnlearnResult:
        """Compute the unlearned state for ``ids`` with ``method`` (nothing is written).

        With ``fallback_to_replay``, a correction the divergence guard flags is
        replaced by exact replay (the audit keeps both: ``fallback_from``)."""
        used, unused = self.split_used(ids)
        if not used:
            raise UnlearnError(f"samples {unused[:5]} were never used in a recorded training step: nothing to forget")
        if unused:
            log.info("samples %s were never used in a recorded step: nothing to unlearn for them", unused[:10])
        with recorded_threads(self.log.meta.get("torch_num_threads")):
            result = self._run_method(method, used, **kwargs)
            if fallback_to_replay and result.info.get("diverged"):
                log.warning("%s diverged; falling back to exact replay", result.method)
                first = {k: result.info.get(k) for k in ("method", "K", "hessian_mode", "retain_loss_after",
                                                          "seconds", "grad_equivalents_total")}
                result = self._run_method("replay", used)
                result.info["fallback_from"] = first
                result.info["seconds"] += first["seconds"] or 0.0
                result.info["grad_equivalents_total"] += first["grad_equivalents_total"] or 0.0
        result.info["unused_ids"] = unused
        return result

    def _run_method(self, method: str, ids: list[int], K: int = 800, hessian_mode: str = "exact",
                    damping: float = 1e-4, lr: float = 1e-4, steps: int = 5, **extra: Any) -> UnlearnResult:
        method = canonical_method(method)
        if K < 1:
            raise UnlearnError(f"K={K}: the propagation window must be >= 1 step")
        touched = self.steps_for(ids)
        t0 = time.perf_counter()
        if method == "replay":
            return self._replay(ids, touched, t0)
        if method == "GradAscent":
            return self._grad_ascent(ids, touched, lr, steps, t0)
        if hessian_mode == "diag" and self.log.storage != "diag" and method not in ("rollback",):
            raise UnlearnError("hessian_mode=diag needs a log recorded with training_logger.storage=diag "
                               "(or compute_diag_h=true); use hessian_mode=GGN or exact")
        level = "batch" if method == "LMCleanerBatchLevel" else "sample"
        if method == "LMCleanerSampleLevel":
            algo = LMCleanerSampleLevel(K=K, hessian_mode=hessian_mode, damping=damping, **extra)
        elif method == "LMCleanerBatchLevel":
            algo = LMCleanerBatchLevel(K=K, hessian_mode=hessian_mode, damping=damping, **extra)
        elif method == "rollback":
            algo = Rollback(level=extra.pop("level", "sample"))
        else:
            algo = SGDFormula(level=extra.pop("level", "sample"), K=K, hessian_mode=hessian_mode, damping=damping)
        forget = touched if level == "batch" else ids
        start = touched[0]
        # Past the last injection + K steps nothing is propagated: the sweep can stop there.
        reach = 0 if method == "rollback" else K
        end = min(self.tau, touched[-1] + reach + 1)
        restore = self.log.restore_point_for(start).step
        steps_iter = self.replayer.iter_steps(start, end)
        diag = self.log.diag_provider() if hessian_mode == "diag" and self.log.storage == "diag" else None
        corr = algo.compute(self.template, steps_iter, self.spec, forget, self.tau, diag, last_injection=touched[-1])
        theta, opt_state = self.replayer.state_at(self.tau)
        params, new_state = apply_correction(theta, opt_state, corr)
        seconds = time.perf_counter() - t0
        guard = self.retain_guard(theta, params, ids)
        audit = corr.audit.to_json()
        recovery = (start - restore) + (end - start)  # training steps replayed to recover past parameters
        info = {**audit, "method": method, "steps_touched": touched, "recovery_steps": recovery,
                "grad_equivalents_total": audit["grad_equivalents"] + recovery, "seconds": seconds,
                "sweep_range": [start, end], "restored_from": restore, **guard}
        if guard["diverged"]:
            log.warning("%s: the correction raised the retain loss from %.3f to %.3f; the linearised propagation "
                        "is probably outside its regime (large steps or a large deletion): prefer method=replay",
                        method, guard["retain_loss_before"], guard["retain_loss_after"])
        return UnlearnResult(method, ids, self.tau, params, new_state, info)

    @torch.no_grad()
    def retain_loss(self, params: dict[str, torch.Tensor], ids: list[int]) -> float:
        """Token-mean loss over up to ``GUARD_ROWS`` training rows that are not forgotten."""
        from ..data.collate import Collator
        from ..train.loss import token_nll_sum

        forget = set(ids)
        rows = [i for i in range(len(self.trainer.dataset)) if i not in forget][:GUARD_ROWS]
        model = self.model_with(params).eval()
        batch = Collator(self.trainer.dataset.pad_token_id)([self.trainer.dataset[i] for i in rows])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        n = int((batch["labels"][:, 1:] != -100).sum())
        return float(token_nll_sum(out.logits, batch["labels"])) / max(n, 1)

    def retain_guard(self, theta, params, ids) -> dict[str, Any]:
        """A first-order correction can leave its regime and return a model worse than
        doing nothing; the retain loss (which unlearning should barely move) tells."""
        before, after = self.retain_loss(theta, ids), self.retain_loss(params, ids)
        return {"retain_loss_before": before, "retain_loss_after": after,
                "diverged": bool(after > before * (1 + GUARD_TOLERANCE) + 0.05)}

    def _replay(self, ids: list[int], touched: list[int], t0: float) -> UnlearnResult:
        res = self.replayer.counterfactual(ids, start=touched[0], end=self.tau)
        seconds = time.perf_counter() - t0
        info = {"method": "replay", "steps_touched": touched, "restored_from": res.restored_from,
                "recovery_steps": res.steps_replayed, "grad_equivalents_total": float(res.steps_replayed),
                "grad_equivalents": float(res.steps_replayed), "seconds": seconds, "K": None, "hessian_mode": None}
        return UnlearnResult("replay", ids, self.tau, res.params, res.opt_state, info)

    def _grad_ascent(self, ids: list[int], touched: list[int], lr: float, steps: int, t0: float) -> UnlearnResult:
        theta, _ = self.replayer.state_at(self.tau)
        model = copy.deepcopy(self.template)
        model.load_state_dict(theta, strict=False)
        stats = grad_ascent(model, self.trainer.dataset, ids, lr=lr, steps=steps)
        params = {n: p.detach().clone() for n, p in model.named_parameters() if n in theta}
        info = {"method": "GradAscent", "steps_touched": touched, "lr": lr, "ascent_epochs": steps, **stats,
                "grad_equivalents": float(stats["updates"]), "grad_equivalents_total": float(stats["updates"]),
                "recovery_steps": 0, "seconds": time.perf_counter() - t0, "K": None, "hessian_mode": None}
        return UnlearnResult("GradAscent", ids, self.tau, params, None, info)

    # ---------------------------------------------------------------- write
    def model_with(self, params: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = copy.deepcopy(self.template)
        missing = set(params) - {n for n, _ in model.named_parameters()}
        if missing:
            raise UnlearnError(f"unlearned parameters {sorted(missing)[:3]} are not in the model")
        model.load_state_dict(params, strict=False)
        return model

    # ------------------------------------------------------------- outputs
    @property
    def sources(self) -> list[Path]:
        """What an output must never overwrite: the run and its log."""
        return [self.run_dir, self.log_dir]

    def default_output(self, method: str) -> Path:
        """``<run>/unlearned-<method>``, or ``-2``, ``-3``...: always a fresh name."""
        return fresh_child(self.run_dir, f"unlearned-{canonical_method(method)}")

    def check_output(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Refuse an output over the source (one line); returns the resolved path."""
        return check_output(out_dir, self.sources, overwrite=overwrite, key="unlearn.output_dir",
                            overwrite_key="unlearn.overwrite", allowed_inside=_default_location)

    def reserve_output(self, out_dir: str | Path, overwrite: bool = False) -> AtomicDir:
        """Check ``out_dir`` and create its temporary directory now, before any computation,
        outside the source run (a default output inside the run is renamed into it at the end)."""
        out = self.check_output(out_dir, overwrite)
        inside = [s for s in map(resolved, self.sources) if is_within(out, s)]
        if inside:
            outer = min(inside, key=lambda p: len(p.parts))
            return AtomicDir(out, outer.parent, prefix=f".{outer.name}--", replace=overwrite).reserve()
        return AtomicDir(out, replace=overwrite).reserve()

    def save(self, result: UnlearnResult, out_dir: str | Path, audit_dir: str | Path | None = None,
             request_id: str | None = None, apply: bool = True, overwrite: bool = False,
             reserved: AtomicDir | None = None) -> Path:
        """Write the unlearned model (or only the correction) with its audit record, atomically.

        ``out_dir`` follows :meth:`check_output`; ``reserved``: the directory
        :meth:`reserve_output` already created for it. The audit record is
        written inside the temporary directory before the rename (a kill never
        leaves a model without its audit); replacing an output keeps its earlier
        records. ``audit_dir`` additionally appends the record to a shared log."""
        target = reserved
        try:
            before = weights_fingerprint(self.replayer.state_at(self.tau)[0])
            after = weights_fingerprint(result.params)
            if before == after:
                raise UnlearnError("the unlearned weights equal the original ones bit for bit: refusing to write a "
                                   "no-op result (check the forget ids and the method)")
            if audit_dir is not None:
                check_output(audit_dir, self.sources, overwrite=True, key="trainer.method_args.audit_dir")
            target = target or self.reserve_output(out_dir, overwrite)
            out = target.final
            history = read_audit_records(out / "audit") if out.is_dir() else []
            if apply:
                write_model_files(self.model_with(result.params), self.trainer.tokenizer, target.tmp,
                                  self.trainer.t.save_precision)
            else:
                theta = self.replayer.state_at(self.tau)[0]
                delta = {n: (result.params[n].float() - theta[n].float()).contiguous() for n in result.params}
                save_tensors(delta, target.tmp / "correction.safetensors")
            record = {
                "request_id": request_id or new_request_id(), "forget_ids": result.forget_ids, "tau": result.tau,
                "source_run": str(self.run_dir), "training_log_dir": str(self.log_dir), "output_dir": str(out),
                "applied": apply, "fingerprint_before": before, "fingerprint_after": after,
                "dataset_fingerprint": self.trainer.dataset.fingerprint, **_jsonable(result.info),
            }
            append_audit_record(target.tmp / "audit", record, previous=history)
            target.commit()
        except BaseException:
            if target is not None:
                target.abort()
            raise
        if audit_dir is not None:
            append_audit_record(Path(audit_dir), record)
        return out


def _default_location(out: Path, source: Path) -> bool:
    """The one place inside a run an unlearned result may go: a direct child ``unlearned*``."""
    return out.parent == source and out.name.startswith("unlearned")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


USER_ERRORS = (UnlearnError, ForgetSetError)
