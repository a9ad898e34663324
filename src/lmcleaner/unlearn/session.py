"""An unlearning session over one trained run: open, check, compute, write.

``UnlearnSession(run_dir)`` opens the run's trajectory log, rebuilds the exact
training engine from the recorded config, checks the fingerprints of model
and data, and resolves deletion requests to sample ids and steps.
``session.run(method, ids, **args)`` computes the unlearned state *without
writing*; ``session.save(result, out_dir)`` writes a ``from_pretrained``
directory atomically and appends the audit record. The source run is never
modified.
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
from safetensors.torch import save_file

from ..train.export import export_model
from ..train.trainer import model_fingerprint
from .audit import append_audit_record, new_request_id, weights_fingerprint
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
    def __init__(self, run_dir: str | Path | None = None, log_dir: str | Path | None = None):
        from ..trajectory import TrajectoryLog, TrajectoryReplayer

        if run_dir is None and log_dir is None:
            raise UnlearnError("give the trained run (unlearn.model_dir=...) or trainer.method_args.training_log_dir")
        self.log_dir = Path(log_dir) if log_dir else find_log_dir(Path(run_dir))
        if not (self.log_dir / "meta.json").is_file():
            raise UnlearnError(f"no trajectory log at {self.log_dir} (meta.json missing)")
        self.log = TrajectoryLog(self.log_dir)
        self.replayer = TrajectoryReplayer(self.log)
        self.trainer = self.replayer.trainer
        meta = self.log.meta
        self.run_dir = Path(run_dir) if run_dir else Path(meta.get("output_dir", self.log_dir.parent))
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
        # replay (which mutates the engine's parameters) cannot interfere.
        self.template = copy.deepcopy(self.trainer.engine.unwrapped)
        if getattr(self.template, "is_activation_checkpointing", False):
            # Curvature runs under functional transforms, which checkpointing's input-grad hook breaks;
            # checkpointing saves memory and does not change values.
            self.template.activation_checkpointing_disable()
            self.template.disable_input_require_grads()

    # ------------------------------------------------------------ requests
    def resolve(self, forget: Any) -> list[int]:
        ids = resolve_forget_ids(forget, self.trainer.dataset.records)
        validate_ids(ids, len(self.trainer.dataset))
        return ids

    def split_used(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """(ids used in a recorded step, ids never used). A sample used before the
        recorded window cannot be unlearned from the log: that is an error."""
        lo, _ = self.log.window
        wanted = set(ids)
        steps = self.log.steps_containing(ids)
        used = {i for s in steps if s >= lo for i in self.log.record(s).sample_ids} & wanted
        early = {i for s in steps if s < lo for i in self.log.record(s).sample_ids} & wanted
        unused = sorted(wanted - used - early)
        early |= self._used_before(set(unused), lo)
        if early:
            raise UnlearnError(f"samples {sorted(early)[:5]} were used before the replayable window (steps < {lo}): "
                               "raise training_logger.max_steps or use exact retraining (lmcleaner retrain)")
        return sorted(used), unused

    def steps_for(self, ids: list[int]) -> list[int]:
        used, unused = self.split_used(ids)
        if not used:
            raise UnlearnError(f"samples {unused[:5]} were never used in a recorded training step: nothing to forget")
        lo, _ = self.log.window
        return [s for s in self.log.steps_containing(used) if s >= lo]

    def _used_before(self, ids: set[int], lo: int) -> set[int]:
        """Which of ``ids`` the batch plan put in a step before ``lo`` (one permutation per epoch)."""
        plan, found = self.trainer.plan, set()
        for epoch in range((lo - 1) // plan.steps_per_epoch + 1 if ids and lo > 0 else 0):
            steps = min(plan.steps_per_epoch, lo - epoch * plan.steps_per_epoch)
            found |= set(plan.epoch_order(epoch)[: steps * plan.global_batch]) & ids
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
        budget = self._replay_budget(used)
        with recorded_threads(self.log.meta.get("torch_num_threads")), \
                self.replayer.progress(budget, f"unlearn {method}", self.progress, self.progress_leave):
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

    def _replay_budget(self, ids: list[int]) -> int:
        """Steps a method replays at most: from the restore point before the first use to tau."""
        from ..trajectory import TrajectoryLogError

        try:
            return self.tau - self.log.restore_point_for(self.log.steps_containing(ids)[0]).step
        except TrajectoryLogError:  # the method itself reports it, with its own context
            return self.tau

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

    def save(self, result: UnlearnResult, out_dir: str | Path, audit_dir: str | Path | None = None,
             request_id: str | None = None, apply: bool = True) -> Path:
        """Write the unlearned model (or only the correction) and the audit record."""
        out_dir = Path(out_dir)
        before = weights_fingerprint(self.replayer.state_at(self.tau)[0])
        after = weights_fingerprint(result.params)
        if before == after:
            raise UnlearnError("the unlearned weights equal the original ones bit for bit: refusing to write a "
                               "no-op result (check the forget ids and the method)")
        if apply:
            export_model(self.model_with(result.params), self.trainer.tokenizer, out_dir,
                         self.trainer.t.save_precision)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            theta = self.replayer.state_at(self.tau)[0]
            delta = {n: (result.params[n].float() - theta[n].float()).contiguous() for n in result.params}
            tmp = out_dir / "correction.safetensors.tmp"
            save_file(delta, str(tmp))
            tmp.replace(out_dir / "correction.safetensors")
        record = {
            "request_id": request_id or new_request_id(), "forget_ids": result.forget_ids, "tau": result.tau,
            "source_run": str(self.run_dir), "training_log_dir": str(self.log_dir), "output_dir": str(out_dir),
            "applied": apply, "fingerprint_before": before, "fingerprint_after": after,
            "dataset_fingerprint": self.trainer.dataset.fingerprint, **_jsonable(result.info),
        }
        append_audit_record(Path(audit_dir) if audit_dir else out_dir / "audit", record)
        return out_dir


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


USER_ERRORS = (UnlearnError, ForgetSetError)
