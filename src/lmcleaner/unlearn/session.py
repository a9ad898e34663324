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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..train.export import is_adapter_model, write_adapter_files, write_model_files
from ..train.outputs import AtomicDir, check_output, fresh_child, is_within, resolved, save_tensors
from ..train.trainer import model_fingerprint
from .audit import append_audit_record, new_request_id, read_audit_records, weights_fingerprint
from .certify import certify_config, certify_result
from .forget_set import ForgetSetError, resolve_forget_ids, validate_ids
from .registry import canonical_method, get_method, method_config
from .result import UnlearnError, UnlearnResult


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
        self.progress, self.progress_leave = True, True  # progress display of run() (steps replayed, ETA)
        self.spec = self.log.optimizer_spec
        # The methods evaluate losses functionally; give them their own module so
        # replay (which mutates the engine's parameters) cannot interfere. Under FSDP
        # it is an unsharded copy (every rank: the sweep is data-parallel, not sharded).
        acc = self.trainer.accelerator
        self.template = self.trainer.plain_model(device=acc.device)
        if getattr(self.template, "is_activation_checkpointing", False):
            # Curvature runs under functional transforms, which checkpointing's input-grad hook breaks;
            # checkpointing saves memory and does not change values.
            self.template.activation_checkpointing_disable()
            self.template.disable_input_require_grads()
        # A mixture of experts trained with router losses: they are part of the step loss.
        self.router_aux = self.trainer.engine.router_aux

    # ------------------------------------------------------------ past steps
    def iter_steps(self, start: int, end: int):
        """``ReplayedStep`` for ``start..end-1``: from heavy storage when the log has update
        vectors (``trajectory.heavy``: no replay), else by exact replay. Returns
        ``(iterator, cost)`` where ``cost()`` is the training steps or gradients the
        recovery of past parameters has taken so far."""
        if self.log.storage == "heavy" and self.log.has_updates:
            from ..trajectory.heavy import HeavySteps
            from ..trajectory.reconstruct import BatchReconstructor
            from .functional import FunctionalLM

            fl = FunctionalLM(self.template, list(self.trainer.engine.trainable()), router=self.router_aux)
            rec = BatchReconstructor(self.log, self.trainer.dataset, self.trainer.engine.collator)
            source = HeavySteps(self.log, rec, self.spec, grad_fn=fl.grad)
            return source(start, end), (lambda: float(source.grad_evals))
        before = self.replayer.steps_run
        return self.replayer.iter_steps(start, end), (lambda: float(self.replayer.steps_run - before))

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
    def run(self, method: str, ids: list[int], fallback_to_replay: bool = False, certify: Any = None,
            **kwargs: Any) -> UnlearnResult:
        """Compute the unlearned state for ``ids`` with ``method`` (nothing is written).

        ``kwargs`` are the method's arguments (its ``Config`` in ``unlearn.handlers``;
        unknown names are a one-line error). With ``fallback_to_replay``, a
        correction the divergence guard flags is replaced by exact replay (the
        audit keeps both: ``fallback_from``). ``certify`` (a mapping or
        ``CertifyConfig``): add Gaussian noise for an (epsilon, delta) guarantee
        (``unlearn/certify``), recorded under ``certification``."""
        cls = get_method(method)
        cfg = method_config(cls, kwargs)
        certify_cfg = certify_config(certify) if certify else None
        used, unused = self.split_used(ids)
        if not used:
            raise UnlearnError(f"samples {unused[:5]} were never used in a recorded training step: nothing to forget")
        if unused:
            log.info("samples %s were never used in a recorded step: nothing to unlearn for them", unused[:10])
        budget = self._replay_budget(used)
        with recorded_threads(self.log.meta.get("torch_num_threads")), \
                self.replayer.progress(budget, f"unlearn {cls.name}", self.progress, self.progress_leave):
            result = cls().run(self, used, cfg)
            est = result.info.get("estimated_error")
            check = result.info.get("function_check") or {}
            if est is not None and est >= 1.0:  # its own estimate says: no better than doing nothing
                result.info["diverged"] = True
                result.info["diverged_reason"] = f"estimated error {est:.3g} >= 1 (doing nothing scores 1)"
            elif check.get("flagged"):  # in function space, on the forgotten rows (unlearn.windowed)
                result.info["diverged"] = True
                result.info["diverged_reason"] = (
                    f"on the forgotten rows the answer moves the untouched model {check['ratio']:.3g}x as far "
                    f"(KL) as removing them did at the window's end (> {check['limit']:g}: worse than doing nothing)")
            if fallback_to_replay and result.info.get("diverged") and not cls.exact:
                log.warning("%s diverged; falling back to exact replay", result.method)
                first = {k: result.info.get(k) for k in ("method", "K", "hessian_mode", "retain_loss_after",
                                                          "seconds", "grad_equivalents_total", "estimated_error",
                                                          "diverged_reason")}
                replay = get_method("replay")
                result = replay().run(self, used, method_config(replay))
                result.info["fallback_from"] = first
                result.info["seconds"] += first["seconds"] or 0.0
                result.info["grad_equivalents_total"] += first["grad_equivalents_total"] or 0.0
            if certify_cfg is not None:
                result = certify_result(self, result, certify_cfg)
        result.info["unused_ids"] = unused
        return result

    def _replay_budget(self, ids: list[int]) -> int:
        """Steps a method replays at most: from the restore point before the first use to tau."""
        from ..trajectory import TrajectoryLogError

        try:
            return self.tau - self.log.restore_point_for(self.log.steps_containing(ids)[0]).step
        except TrajectoryLogError:  # the method itself reports it, with its own context
            return self.tau

    @torch.no_grad()
    def retain_loss(self, params: dict[str, torch.Tensor], ids: list[int]) -> float:
        """Token-mean loss over up to ``GUARD_ROWS`` training rows that are not forgotten."""
        from ..data.collate import Collator
        from ..train.loss import token_nll_sum

        forget = set(ids)
        rows = [i for i in range(len(self.trainer.dataset)) if i not in forget][:GUARD_ROWS]
        model = self.model_with(params).eval()
        batch = Collator(self.trainer.dataset.pad_token_id)([self.trainer.dataset[i] for i in rows])
        dev = next(model.parameters()).device
        out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                    use_cache=False)
        n = int((batch["labels"][:, 1:] != -100).sum())
        return float(token_nll_sum(out.logits, batch["labels"])) / max(n, 1)

    def retain_guard(self, theta, params, ids) -> dict[str, Any]:
        """A first-order correction can leave its regime and return a model worse than
        doing nothing; the retain loss (which unlearning should barely move) tells."""
        before, after = self.retain_loss(theta, ids), self.retain_loss(params, ids)
        return {"retain_loss_before": before, "retain_loss_after": after,
                "diverged": bool(after > before * (1 + GUARD_TOLERANCE) + 0.05)}

    @torch.no_grad()
    def forget_kl(self, target: dict[str, torch.Tensor], model: dict[str, torch.Tensor], ids: list[int]) -> float:
        """Mean per-token ``KL(target || model)`` over the answer tokens of the forgotten rows
        ``ids`` (two forward passes over them, float64 arithmetic)."""
        from ..evaluate.fidelity import kl_to_oracle

        items = [self.trainer.dataset[i] for i in ids]
        sums, counts = kl_to_oracle(self.model_with(model), self.model_with(target), items,
                                    pad_token_id=self.trainer.dataset.pad_token_id)
        total = sum(counts)
        return sum(x for x, c in zip(sums, counts) if c) / total if total else 0.0

    # ---------------------------------------------------------------- write
    def model_with(self, params: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = copy.deepcopy(self.template)
        missing = set(params) - {n for n, _ in model.named_parameters()}
        if missing:
            raise UnlearnError(f"unlearned parameters {sorted(missing)[:3]} are not in the model")
        model.load_state_dict(params, strict=False)
        return model

    @property
    def is_main_process(self) -> bool:
        return self.trainer.accelerator.is_main_process

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

    def reserve_output(self, out_dir: str | Path, overwrite: bool = False) -> AtomicDir | None:
        """Check ``out_dir`` and create its temporary directory now, before any computation,
        outside the source run (a default output inside the run is renamed into it at the end).
        Under several processes only the main one writes: the others get ``None``."""
        if not self.is_main_process:
            return None
        out = self.check_output(out_dir, overwrite)
        if out.is_dir():  # replacing an output keeps its audit: a damaged one is refused now, not after the work
            read_audit_records(out / "audit")
        inside = [s for s in map(resolved, self.sources) if is_within(out, s)]
        if inside:
            outer = min(inside, key=lambda p: len(p.parts))
            return AtomicDir(out, outer.parent, prefix=f".{outer.name}--", replace=overwrite).reserve()
        return AtomicDir(out, replace=overwrite).reserve()

    def check_export(self, export: str) -> None:
        """``merged`` always works; ``adapter`` needs a LoRA run (one-line error otherwise)."""
        if export not in ("merged", "adapter"):
            raise UnlearnError(f"unknown unlearn.export={export!r}: choose merged or adapter")
        if export == "adapter" and not is_adapter_model(self.template):
            raise UnlearnError("unlearn.export=adapter needs a LoRA run (trained with lora.enabled=true); "
                               "use unlearn.export=merged")

    def save(self, result: UnlearnResult, out_dir: str | Path, audit_dir: str | Path | None = None,
             request_id: str | None = None, apply: bool = True, overwrite: bool = False,
             reserved: AtomicDir | None = None, export: str = "merged",
             requests: list[dict[str, Any]] | None = None) -> Path:
        """Write the unlearned model (or only the correction) with its audit record, atomically.

        ``requests`` (``[{"request_id", "ids"}]``, :mod:`lmcleaner.unlearn.requests`): the result
        answers these requests jointly; each gets its own audit record instead of one.

        ``out_dir`` follows :meth:`check_output`; ``reserved``: the directory
        :meth:`reserve_output` already created for it. ``export="adapter"``
        (LoRA runs) writes the unlearned adapter for
        ``peft.PeftModel.from_pretrained(base, out_dir)`` instead of the merged model. The audit record is
        written inside the temporary directory before the rename (a kill never
        leaves a model without its audit); replacing an output keeps its earlier
        records. ``audit_dir`` additionally appends the record to a shared log.

        Under several processes every rank calls it (recovering ``theta_tau`` is
        collective) and only the main one writes; the others wait for it."""
        try:
            self.check_export(export)
            theta = self.replayer.state_at(self.tau)[0]
            before = weights_fingerprint(theta)
            after = weights_fingerprint(result.params)
            if before == after:
                raise UnlearnError("the unlearned weights equal the original ones bit for bit: refusing to write a "
                                   "no-op result (check the forget ids and the method)")
        except BaseException:
            if reserved is not None:
                reserved.abort()
            raise
        out = reserved.final if reserved is not None else Path(out_dir)
        if self.is_main_process:
            out = self._write(result, out_dir, audit_dir, request_id, apply, overwrite, reserved, theta, before, after,
                              export, requests)
        self.trainer.accelerator.wait_for_everyone()
        return out

    def _write(self, result: UnlearnResult, out_dir: str | Path, audit_dir, request_id, apply: bool,
               overwrite: bool, reserved: AtomicDir | None, theta, before: str, after: str,
               export: str = "merged", requests: list[dict[str, Any]] | None = None) -> Path:
        from .requests import joint_records

        target = reserved
        try:
            if audit_dir is not None:
                check_output(audit_dir, self.sources, overwrite=True, key="trainer.method_args.audit_dir")
            target = target or self.reserve_output(out_dir, overwrite)
            out = target.final
            history = read_audit_records(out / "audit") if out.is_dir() else []
            if apply and export == "adapter":
                write_adapter_files(self.model_with(result.params), self.trainer.tokenizer, target.tmp,
                                    self.trainer.t.save_precision, base_model=self.trainer.config.model.name_or_path)
            elif apply:
                write_model_files(self.model_with(result.params), self.trainer.tokenizer, target.tmp,
                                  self.trainer.t.save_precision)
            else:
                delta = {n: (result.params[n].float() - theta[n].float()).contiguous() for n in result.params}
                save_tensors(delta, target.tmp / "correction.safetensors")
            record = {
                "request_id": request_id or new_request_id(), "forget_ids": result.forget_ids, "tau": result.tau,
                "source_run": str(self.run_dir), "training_log_dir": str(self.log_dir), "output_dir": str(out),
                "applied": apply, "export": export if apply else None,
                "fingerprint_before": before, "fingerprint_after": after,
                "dataset_fingerprint": self.trainer.dataset.fingerprint, **_jsonable(result.info),
            }
            records = joint_records(record, requests) if requests else [record]
            for rec in records:
                append_audit_record(target.tmp / "audit", rec, previous=history)
            target.commit()
        except BaseException:
            if target is not None:
                target.abort()
            raise
        if audit_dir is not None:
            for rec in records:
                append_audit_record(Path(audit_dir), rec)
        return out


def _default_location(out: Path, source: Path) -> bool:
    """The one place inside a run an unlearned result may go: a direct child ``unlearned*``."""
    return out.parent == source and out.name.startswith("unlearned")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


USER_ERRORS = (UnlearnError, ForgetSetError)
__all__ = ["USER_ERRORS", "UnlearnError", "UnlearnResult", "UnlearnSession", "canonical_method", "find_log_dir",
           "recorded_threads"]
