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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..train.export import export_adapter, export_model, is_adapter_model
from ..train.trainer import model_fingerprint
from .audit import append_audit_record, new_request_id, weights_fingerprint
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
        self.spec = self.log.optimizer_spec
        # The methods evaluate losses functionally; give them their own module so
        # replay (which mutates the engine's parameters) cannot interfere.
        self.template = copy.deepcopy(self.trainer.engine.unwrapped)
        # A mixture of experts trained with router losses: they are part of the step loss.
        self.router_aux = self.trainer.engine.router_aux

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

        ``kwargs`` are the method's arguments (its ``Config`` in ``unlearn.handlers``;
        unknown names are a one-line error). With ``fallback_to_replay``, a
        correction the divergence guard flags is replaced by exact replay (the
        audit keeps both: ``fallback_from``)."""
        cls = get_method(method)
        cfg = method_config(cls, kwargs)
        used, unused = self.split_used(ids)
        if not used:
            raise UnlearnError(f"samples {unused[:5]} were never used in a recorded training step: nothing to forget")
        if unused:
            log.info("samples %s were never used in a recorded step: nothing to unlearn for them", unused[:10])
        with recorded_threads(self.log.meta.get("torch_num_threads")):
            result = cls().run(self, used, cfg)
            if fallback_to_replay and result.info.get("diverged") and not cls.exact:
                log.warning("%s diverged; falling back to exact replay", result.method)
                first = {k: result.info.get(k) for k in ("method", "K", "hessian_mode", "retain_loss_after",
                                                          "seconds", "grad_equivalents_total")}
                replay = get_method("replay")
                result = replay().run(self, used, method_config(replay))
                result.info["fallback_from"] = first
                result.info["seconds"] += first["seconds"] or 0.0
                result.info["grad_equivalents_total"] += first["grad_equivalents_total"] or 0.0
        result.info["unused_ids"] = unused
        return result

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

    # ---------------------------------------------------------------- write
    def model_with(self, params: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = copy.deepcopy(self.template)
        missing = set(params) - {n for n, _ in model.named_parameters()}
        if missing:
            raise UnlearnError(f"unlearned parameters {sorted(missing)[:3]} are not in the model")
        model.load_state_dict(params, strict=False)
        return model

    def check_export(self, export: str) -> None:
        """``merged`` always works; ``adapter`` needs a LoRA run (one-line error otherwise)."""
        if export not in ("merged", "adapter"):
            raise UnlearnError(f"unknown unlearn.export={export!r}: choose merged or adapter")
        if export == "adapter" and not is_adapter_model(self.template):
            raise UnlearnError("unlearn.export=adapter needs a LoRA run (trained with lora.enabled=true); "
                               "use unlearn.export=merged")

    def save(self, result: UnlearnResult, out_dir: str | Path, audit_dir: str | Path | None = None,
             request_id: str | None = None, apply: bool = True, export: str = "merged") -> Path:
        """Write the unlearned model (or only the correction) and the audit record.

        ``export="adapter"`` (LoRA runs) writes the unlearned adapter for
        ``peft.PeftModel.from_pretrained(base, out_dir)`` instead of the merged model."""
        self.check_export(export)
        out_dir = Path(out_dir)
        before = weights_fingerprint(self.replayer.state_at(self.tau)[0])
        after = weights_fingerprint(result.params)
        if before == after:
            raise UnlearnError("the unlearned weights equal the original ones bit for bit: refusing to write a "
                               "no-op result (check the forget ids and the method)")
        if apply and export == "adapter":
            export_adapter(self.model_with(result.params), self.trainer.tokenizer, out_dir,
                           self.trainer.t.save_precision, base_model=self.trainer.config.model.name_or_path)
        elif apply:
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
            "applied": apply, "export": export if apply else None, "fingerprint_before": before, "fingerprint_after": after,
            "dataset_fingerprint": self.trainer.dataset.fingerprint, **_jsonable(result.info),
        }
        append_audit_record(Path(audit_dir) if audit_dir else out_dir / "audit", record)
        return out_dir


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


USER_ERRORS = (UnlearnError, ForgetSetError)
__all__ = ["USER_ERRORS", "UnlearnError", "UnlearnResult", "UnlearnSession", "canonical_method", "find_log_dir",
           "recorded_threads"]
