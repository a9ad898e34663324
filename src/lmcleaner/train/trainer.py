"""The training loop on Accelerate: flat and readable.

``Trainer(config).train()`` builds tokenizer, data, model, optimizer and
scheduler, optionally resumes, then runs :func:`engine.run_step` once per
step, with the trajectory recorder, evaluation, early stopping, best-model
export, checkpoint rotation and online deletion requests around it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .. import telemetry
from ..config.loader import to_dict
from ..data import BatchPlan, Collator, build_dataset, load_tokenizer
from . import checkpoint as ckpt
from . import distributed
from .engine import Engine, run_step
from .export import export_model
from .hooks import NullRecorder
from .loss import per_sample_nll
from .model import build_model
from .optim import build_optimizer, build_scheduler, optimizer_spec
from .outputs import clean_stale
from .runlock import lock_dirs
from .state import TrainState

log = logging.getLogger("lmcleaner.training")

OnlineUnlearner = Callable[["Trainer", list[int], int], dict]


def _recorder_stats(recorder) -> dict[str, float]:
    stats = getattr(recorder, "stats", None)
    if stats is None:
        return {}
    d = stats.to_json() if hasattr(stats, "to_json") else dict(stats)
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


class TrainingError(RuntimeError):
    pass


def _configured_unlearner(t) -> OnlineUnlearner | None:
    """``training.online_unlearning.method=...`` (the command line's way to attach one)."""
    oc = getattr(t, "online_unlearning", None)
    if oc is None or not oc.method:
        return None
    import dataclasses

    from ..unlearn.online import OnlineUnlearner as Online
    from ..unlearn.registry import get_method, method_config

    cls = get_method(oc.method)  # a one-line error for an unknown name, before anything runs
    # K, hessian_mode, damping belong to the LMCleaner methods (auto takes K as its first window);
    # replay (exact) and others take what they have. Unset keys keep the method's own default.
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    args = {k: v for k, v in (("K", oc.K), ("hessian_mode", oc.hessian_mode), ("damping", oc.damping))
            if k in fields and v is not None}
    method_config(cls, args)  # bad values fail now too
    return Online(cls.name, **args)


def run_meta(config, engine: Engine, spec, total_steps: int, output_dir) -> dict[str, Any]:
    """What the trajectory recorder writes into ``meta.json`` about a run (also used by
    :mod:`lmcleaner.integrations` for Hugging Face ``Trainer`` runs)."""
    t = config.training
    return {
        "config": to_dict(config),
        "optimizer": spec.to_json(),
        "dataset_fingerprint": engine.dataset.fingerprint,
        "num_samples": len(engine.dataset),
        "model_fingerprint": model_fingerprint(engine.trainable()),
        "world_size": engine.world_size,
        "batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "seed": t.seed,
        "total_steps": total_steps,
        # CPU kernels reduce in a thread-count-dependent order: replay needs the same count to be bit-exact.
        "torch_num_threads": torch.get_num_threads(),
        "output_dir": str(output_dir),
    }


def model_fingerprint(params: dict[str, torch.Tensor]) -> str:
    """Names, shapes and dtypes of the trainable parameters (architecture identity)."""
    import hashlib

    h = hashlib.sha256()
    for n in sorted(params):
        h.update(f"{n}:{tuple(params[n].shape)}:{params[n].dtype};".encode())
    return h.hexdigest()[:32]


class Trainer:
    def __init__(self, config, model: torch.nn.Module | None = None, tokenizer=None, recorder=None,
                 online_unlearner: OnlineUnlearner | None = None, accelerator: Accelerator | None = None):
        self.config = config
        self.t = config.training
        self.online_unlearner = online_unlearner if online_unlearner is not None else _configured_unlearner(self.t)
        self._pending: list[dict] = []
        self.accelerator = accelerator or distributed.build_accelerator(self.t)
        set_seed(self.t.seed)
        if self.t.torch_threads > 0:
            torch.set_num_threads(self.t.torch_threads)
        # Everything that can fail on bad input happens before the output dir exists.
        self.tokenizer = tokenizer or load_tokenizer(config.model.tokenizer, config.model.name_or_path,
                                                    config.model.trust_remote_code)
        show = self.t.progress_bar and self.accelerator.is_main_process
        self.dataset = build_dataset(self.t, self.tokenizer, progress=show)
        self.eval_dataset = None
        if self.t.validation_dataset:
            self.eval_dataset = build_dataset(self.t, self.tokenizer, source=self.t.validation_dataset,
                                              split=self.t.validation_split)
        if self.t.resume_from_checkpoint:
            self._resume_path = self._find_resume(self.t.resume_from_checkpoint)
        else:
            self._resume_path = None
        self.model = model if model is not None else build_model(config.model, self.tokenizer, self.t.seed, config.lora)
        if self.t.gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None) or self.model.gradient_checkpointing_enable
            enable()
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        optimizer = build_optimizer(named, self.t)
        self.sharded = distributed.is_fsdp(self.accelerator)
        if self.sharded:
            self._check_fsdp(config)
        # FSDP: a tensor-free copy taken before sharding, so exports can build an unsharded model
        self._skeleton = distributed.meta_skeleton(self.model) if self.sharded else None
        self.plan = BatchPlan(len(self.dataset), self.t.batch_size, self.t.gradient_accumulation_steps,
                              self.accelerator.num_processes, self.t.seed)
        total = self.t.max_steps if self.t.max_steps > 0 else self.t.num_epochs * self.plan.steps_per_epoch
        scheduler = build_scheduler(optimizer, self.t, total)
        model, optimizer = self.accelerator.prepare(self.model, optimizer)
        self.engine = Engine(self.accelerator, model, optimizer, scheduler, self.dataset,
                             Collator(self.dataset.pad_token_id), self.t, self.t.seed)
        self.state = TrainState(total_steps=total, excluded={int(i): 0 for i in self.t.exclude_ids})
        self.output_dir = Path(self.t.output_dir)
        self.recorder = recorder if recorder is not None else self._build_recorder()
        self.optimizer_spec = optimizer_spec(optimizer, self.t)

    # ----------------------------------------------------------------- setup
    @staticmethod
    def _check_fsdp(config) -> None:
        storage = config.training_logger.storage if config.training_logger.enabled else "light"
        if storage != "light":
            raise TrainingError(f"training_logger.storage={storage} stores per-step full tensors, which FSDP shards; "
                                "use training_logger.storage=light with distributed_strategy=fsdp, or ddp")

    def plain_model(self, here: bool = True, device: str | torch.device = "cpu") -> torch.nn.Module | None:
        """An unsharded copy of the model as it is now (FSDP: a collective, every rank calls
        it; ``here``: whether this rank keeps the copy, built on ``device``)."""
        return distributed.plain_copy(self.engine.unwrapped, self._skeleton, here=here, device=device)

    def _export(self, path: Path) -> None:
        """``from_pretrained`` directory on the main process (FSDP: gathered from every rank first)."""
        main = self.accelerator.is_main_process
        model = self.plain_model(here=main) if self.sharded else self.engine.unwrapped
        if main:
            export_model(model, self.tokenizer, path, self.t.save_precision)

    def _find_resume(self, where: str) -> Path:
        if where == "latest":
            found = ckpt.list_checkpoints(self.t.output_dir)
            if not found:
                raise ckpt.CheckpointError(f"resume_from_checkpoint=latest but no checkpoint in {self.t.output_dir}")
            return found[max(found)]
        path = Path(where)
        ckpt.read_trainer_state(path)  # raises a one-line error when it is not a checkpoint
        return path

    def _build_recorder(self):
        lcfg = self.config.training_logger
        if not lcfg.enabled:
            return NullRecorder()
        from ..trajectory import FollowerRecorder, TrainingLogger

        log_dir = Path(lcfg.log_dir) if lcfg.log_dir else self.output_dir / "training_log"
        if not self.accelerator.is_main_process:
            # same checkpoint decisions (all ranks reach the barrier); reads the main rank's log, writes nothing
            return FollowerRecorder(lcfg, log_dir)
        return TrainingLogger(lcfg, log_dir)

    def run_meta(self) -> dict[str, Any]:
        return run_meta(self.config, self.engine, self.optimizer_spec, self.state.total_steps, self.output_dir)

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, reason: str) -> Path | None:
        s = self.state.step
        self.state.checkpoint_reasons.setdefault(s, [])
        if reason not in self.state.checkpoint_reasons[s]:
            self.state.checkpoint_reasons[s].append(reason)
        path = ckpt.checkpoint_dir(self.output_dir, s)
        trainer_state = {**self.state.to_json(), "config": to_dict(self.config),
                         "dataset_fingerprint": self.dataset.fingerprint,
                         "world_size": self.accelerator.num_processes}
        if self.sharded:  # every rank writes its part
            ckpt.save_checkpoint(path, self.engine.trainable(), self.engine.optimizer, self.engine.scheduler,
                                 trainer_state, ckpt.Ranks.of(self.accelerator))
        if self.accelerator.is_main_process:
            if not self.sharded:
                ckpt.save_checkpoint(path, self.engine.trainable(), self.engine.optimizer, self.engine.scheduler,
                                     trainer_state)
            self.recorder.on_checkpoint(s, path)
            self._rotate()
        self.accelerator.wait_for_everyone()
        return path

    def _rotate(self) -> None:
        found = ckpt.list_checkpoints(self.output_dir)
        keep = set(self.recorder.required_checkpoints(self.state.step))
        keep.add(self.state.step)
        if self.state.best_step is not None:
            keep.add(self.state.best_step)
        limited = sorted(s for s in found if "save_steps" in self.state.checkpoint_reasons.get(s, []))
        if self.t.save_total_limit:
            keep.update(limited[-self.t.save_total_limit:])
        else:
            keep.update(limited)
        for s, path in found.items():
            reasons = self.state.checkpoint_reasons.get(s, [])
            if s not in keep and "final" not in reasons:
                shutil.rmtree(path, ignore_errors=True)
                self.state.checkpoint_reasons.pop(s, None)

    def _resume(self) -> None:
        loaded = ckpt.load_checkpoint(self._resume_path, self.engine.trainable(), self.engine.optimizer,
                                      self.engine.scheduler)
        if loaded.get("dataset_fingerprint") not in (None, self.dataset.fingerprint):
            raise ckpt.CheckpointError(f"checkpoint {self._resume_path} was trained on other data (fingerprint mismatch)")
        total = self.state.total_steps
        self.state = TrainState.from_json(loaded)
        self.state.total_steps = total
        log.info("resumed from %s at step %d", self._resume_path, self.state.step)

    # -------------------------------------------------------------- requests
    def request_forget(self, sample_ids: list[int], request_id: str | None = None) -> None:
        """Queue a deletion request; it is applied before the next step."""
        self._pending.append({"request_id": request_id or f"api-{len(self.state.processed_requests) + len(self._pending)}",
                              "ids": [int(i) for i in sample_ids]})

    def _poll_request_file(self) -> None:
        path = self.t.forget_request_file
        if not path or not Path(path).is_file():
            return
        st = Path(path).stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == getattr(self, "_request_file_stamp", None):
            return  # unchanged since the last step: no read on the hot path
        self._request_file_stamp = stamp
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except json.JSONDecodeError:
                continue  # a request still being written; read it next step
            ok = isinstance(req, dict) and isinstance(req.get("ids"), list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in req["ids"])
            if not ok:
                raise TrainingError(f"{path}: {line.strip()[:60]!r} is not a deletion request; write lines like "
                                    '{"request_id": "r1", "ids": [17, 203]}')
            rid = str(req.get("request_id", ""))
            if rid and rid not in self.state.processed_requests and all(p["request_id"] != rid for p in self._pending):
                self._pending.append({"request_id": rid, "ids": [int(i) for i in req["ids"]]})

    def _sync_requests(self) -> None:
        """Several ranks: every rank applies the union of all ranks' pending requests (in rank
        order, one per request id), so a request is seen by all at the same step."""
        merged, seen = [], set()
        for part in distributed.all_gather_json(self._pending or None, self.accelerator):
            for req in part or []:
                if req["request_id"] not in seen:
                    seen.add(req["request_id"])
                    merged.append(req)
        self._pending = merged

    def _apply_requests(self) -> None:
        if self.accelerator.is_main_process:  # one reader of the request file; _sync_requests shares it
            self._poll_request_file()
        # one small collective per step, only where requests can be served (the same on every rank);
        # without an unlearner a request fails on the rank that got it, and torchrun stops the others
        if self.accelerator.num_processes > 1 and (self.online_unlearner is not None or self.t.forget_request_file):
            self._sync_requests()
        if not self._pending:
            return
        # every request pending at this step is answered by one joint correction: one replay or one
        # propagation serves them all (k requests cost one), and each still gets its own event
        requests, self._pending = self._pending, []
        asked: list[tuple[dict, list[int]]] = []
        for req in requests:
            ids = [i for i in req["ids"] if i not in self.state.excluded]
            bad = [i for i in ids if not 0 <= i < len(self.dataset)]
            if bad:
                raise TrainingError(f"deletion request {req['request_id']}: unknown sample ids {bad[:5]}")
            asked.append((req, ids))
        if self.online_unlearner is None:
            raise TrainingError("a deletion request arrived but no online unlearner is attached: set "
                                "training.online_unlearning.method=auto (or replay), or pass "
                                "Trainer(..., online_unlearner=lmcleaner.unlearn.OnlineUnlearner(...))")
        union = list(dict.fromkeys(i for _, ids in asked for i in ids))  # request order, no repeats
        info = self.online_unlearner(self, union, self.state.step) if union else {}
        for i in union:
            self.state.excluded[i] = self.state.step
        joint = [req["request_id"] for req, _ in asked] if len(asked) > 1 else None
        for req, ids in asked:
            event = {"request_id": req["request_id"], "step": self.state.step, "ids": ids, **(info or {})}
            if joint:
                event["joint_with"] = [r for r in joint if r != req["request_id"]]
            self.state.unlearn_events.append(event)
            self.state.processed_requests.append(req["request_id"])
            self.recorder.on_unlearn_event(event)

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_dataset is None:
            return {}
        model = self.engine.model
        model.eval()
        collate = Collator(self.eval_dataset.pad_token_id)
        nll, count = 0.0, 0
        ids = list(range(len(self.eval_dataset)))
        for k in range(0, len(ids), self.t.batch_size):
            batch = collate([self.eval_dataset[i] for i in ids[k:k + self.t.batch_size]])
            out = model(input_ids=batch["input_ids"].to(self.accelerator.device),
                        attention_mask=batch["attention_mask"].to(self.accelerator.device), use_cache=False)
            s, c = per_sample_nll(out.logits, batch["labels"].to(self.accelerator.device))
            nll += float(s.sum())
            count += int(c.sum())
        model.train()
        loss = nll / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}

    def _after_eval(self, metrics: dict[str, float]) -> bool:
        """Update best model / early stopping; returns True to stop."""
        value = metrics[self.t.metric_for_best_model]
        best = self.state.best_metric
        improved = best is None or value < best - self.t.early_stopping_threshold
        if improved:
            self.state.best_metric, self.state.best_step, self.state.bad_evals = value, self.state.step, 0
            if self.t.save_best_model:
                self._export(self.output_dir / "best_model")
        else:
            self.state.bad_evals += 1
        return self.t.early_stopping and self.state.bad_evals >= self.t.early_stopping_patience

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainState:
        """Train (or resume) to the step budget while holding the run's exclusive lock."""
        if self.t.forget_request_file and self.online_unlearner is None:  # before anything is created
            raise TrainingError(f"training.forget_request_file={self.t.forget_request_file} needs an online "
                                "unlearner: set training.online_unlearning.method=auto (or replay)")
        locks = []
        if self.accelerator.is_main_process:  # one writer per run: a second one is refused here, writing nothing
            lcfg = self.config.training_logger
            dirs = [self.output_dir] + ([Path(lcfg.log_dir)] if lcfg.enabled and lcfg.log_dir else [])
            locks = lock_dirs(dirs, ["training.output_dir", "training_logger.log_dir"])
            clean_stale(self.output_dir)  # temp dirs of a killed writer (checkpoint-N.tmp-PID)
        try:
            return self._train_locked()
        finally:
            for lk in locks:
                lk.release()

    def _train_locked(self) -> TrainState:
        acc = self.accelerator
        if self._resume_path is not None:
            self._resume()
        elif acc.is_main_process and self.output_dir.exists() and ckpt.list_checkpoints(self.output_dir):
            raise TrainingError(f"{self.output_dir} already holds checkpoints: set training.resume_from_checkpoint=latest "
                                "or choose another training.output_dir")
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        owns_telemetry = self._start_telemetry()
        bar = telemetry.progress_bar(total=self.state.total_steps, initial=self.state.step, desc="train",
                                     enabled=self.t.progress_bar and acc.is_main_process, unit="step")
        t0, tokens = time.perf_counter(), 0
        try:
            self.recorder.on_train_begin(self.engine, self.run_meta(), self.state.step)
            if self.state.step == 0 and self.recorder.wants_checkpoint(0):
                self.save_checkpoint("recorder")
            wandb_run = self._init_wandb()
            while self.state.step < self.state.total_steps:
                self._apply_requests()
                s = self.state.step
                epoch, _ = self.plan.locate(s)
                self.state.epoch = epoch
                record = run_step(self.engine, s, epoch, self.plan.micro_batches(s), set(self.state.excluded),
                                  self.recorder)
                self.state.step = s + 1
                tokens += record.normaliser
                row = {"step": s, "loss": record.loss, "lr": record.lrs[-1], "grad_norm": record.grad_norm}
                self.state.history.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{record.loss:.4f}")
                if self.t.logging_steps and (s + 1) % self.t.logging_steps == 0:
                    self._log({**row, "tokens_per_s": tokens / (time.perf_counter() - t0)}, wandb_run)
                stop = False
                if self.t.eval_steps and self.state.step % self.t.eval_steps == 0 and self.eval_dataset is not None:
                    metrics = self.evaluate()
                    self.state.eval_history.append({"step": self.state.step, **metrics})
                    self._log({"step": s, **metrics}, wandb_run)
                    stop = self._after_eval(metrics)
                done = stop or self.state.step >= self.state.total_steps
                if done:
                    self.state.stopped_early = stop
                    self.save_checkpoint("final")
                elif self.t.save_steps and self.state.step % self.t.save_steps == 0:
                    self.save_checkpoint("save_steps")
                elif self.recorder.wants_checkpoint(self.state.step):
                    self.save_checkpoint("recorder")
                if stop:
                    log.info("early stopping at step %d", self.state.step)
                    break
        except BaseException:
            if owns_telemetry:  # a failed run must not leave its logging configuration behind
                telemetry.shutdown()
            raise
        finally:
            bar.close()
            self.recorder.close()
        self._export(self.output_dir / "final_model")
        if acc.is_main_process:
            ckpt.write_json_atomic(self.output_dir / "trainer_state.json",
                                   {**self.state.to_json(), "config": to_dict(self.config),
                                    "dataset_fingerprint": self.dataset.fingerprint,
                                    "world_size": acc.num_processes})
            telemetry.log_memory_usage(self.state.step)
            stats = _recorder_stats(self.recorder)
            if stats:
                telemetry.emit_metrics(telemetry.get_system_logger(), {f"recorder_{k}": v for k, v in stats.items()},
                                       step=self.state.step, message="trajectory recorder")
            if owns_telemetry:
                telemetry.shutdown()
        acc.wait_for_everyone()
        if wandb_run is not None:
            wandb_run.finish()
        return self.state

    def _start_telemetry(self) -> bool:
        """Default telemetry under <output_dir>/telemetry unless the user initialised their own."""
        if not self.accelerator.is_main_process or telemetry.is_initialized():
            return False
        telemetry.initialize(self.config.telemetry_config, output_dir=str(self.output_dir / "telemetry"))
        return True

    def _init_wandb(self):
        if not (self.t.log_to_wandb and self.accelerator.is_main_process):
            return None
        try:
            import wandb
        except ImportError:
            raise TrainingError("training.log_to_wandb=true needs `pip install wandb`") from None
        return wandb.init(project="lmcleaner", config=to_dict(self.config))

    def _log(self, metrics: dict[str, Any], wandb_run) -> None:
        if not self.accelerator.is_main_process:
            return
        telemetry.log_training_progress(int(metrics["step"]), {k: v for k, v in metrics.items() if k != "step"})
        if wandb_run is not None:
            wandb_run.log(metrics, step=int(metrics["step"]))
