"""Hugging Face ``Trainer`` / TRL ``SFTTrainer`` runs that ``lmcleaner unlearn`` can replay exactly.

Why the recorder takes over the step. Exact unlearning replays the run
without the forgotten samples (DESIGN §3), and the replayer rebuilds
*lmcleaner's* engine from ``meta.json``. A recorded Hugging Face run is
therefore made to compute, step for step, what that engine computes, using
the same functions (``train.engine.micro_batch_loss``, ``BatchPlan``,
``Collator``, ``build_optimizer``/``build_scheduler``); the user keeps the
model, the data preparation (tokenisation, chat template, label masking by
their collator or by TRL), ``TrainingArguments``, callbacks, logging,
evaluation and Hugging Face checkpoints. Concretely, :class:`LMCleanerRecorderMixin`:

- **data**: every training row goes through the script's own data collator
  *alone* (so its label masking is kept, its padding is not) and the
  resulting ``input_ids``/``labels`` are the run's pre-tokenised dataset,
  written to ``<record_dir>/train_dataset.jsonl`` with the row's original
  text fields (so ``unlearn.forget=rows.jsonl`` can match rows). Sample id =
  row index; the dataset fingerprint hashes those rows;
- **sampler**: :class:`~lmcleaner.data.BatchPlan` (order a pure function of
  ``(seed, epoch)``, ``seed = args.data_seed or args.seed``; incomplete global
  batches are dropped), collation with right padding;
- **loss**: ``sum of supervised-token NLL / N`` with one ``N`` (supervised
  tokens after the causal shift) for the whole optimizer step, the quantity
  transformers 5 also optimises with ``num_items_in_batch``, here computed by
  lmcleaner's code so that a replay is bit-exact and a counterfactual
  recomputes ``N`` without the forgotten samples;
- **optimizer / schedule**: ``torch.optim.AdamW`` (``foreach=False``) or
  ``SGD`` and the ``linear|cosine|constant[_with_warmup]`` schedules from the
  ``TrainingArguments`` values, with Hugging Face's rule that biases and norm
  weights get no weight decay; clipping by global norm as Hugging Face does it;
- **dropout RNG**: re-seeded before each step from ``(seed, step)``;
- **records**: per step the sample ids, applied learning rates, normaliser,
  loss, pre-clip gradient norm, clipping flag and RNG seed; lmcleaner
  checkpoints (``theta_0`` and every ``checkpoint_interval`` steps) in
  ``record_dir``; a copy of the initial model and tokenizer
  (``<record_dir>/base_model``) from which the replayer rebuilds the model;
  ``final_model/`` at the end.

Refused, with a one-line :class:`RecordingError` before anything is written,
because the replayer could not reproduce the run (a wrong counterfactual is
worse than none): several processes / DataParallel / DeepSpeed / FSDP,
``fp16`` (loss scaling skips steps), optimizers other than AdamW/SGD, custom
optimizers or ``compute_loss_func``, LR schedules other than
linear/cosine/constant, ``lr_scheduler_kwargs``, label smoothing, NEFTune,
``torch_compile``, ``auto_find_batch_size``, ``model_init``, samplers other
than ``random`` (``group_by_length``, ``sequential``, ``batch_rebalance``),
iterable datasets, TRL packing / padding-free batches / ``loss_type`` other
than ``nll``, collators that return more than ``input_ids``,
``attention_mask``, ``labels``, PEFT models and frozen parameters, and
resuming with ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..data import BatchPlan, Collator, TextDataset, load_records
from ..data.formats import FormatError
from ..train import checkpoint as ckpt
from ..train.engine import Engine, micro_batch_loss, step_seed
from ..train.export import export_model
from ..train.optim import build_optimizer, build_scheduler, optimizer_spec
from ..train.state import TrainState
from ..train.trainer import run_meta
from ..trajectory.types import StepRecord

log = logging.getLogger("lmcleaner.integrations")

DATASET_FILE = "train_dataset.jsonl"
BASE_MODEL_DIR = "base_model"
_BATCH_KEYS = {"input_ids", "attention_mask", "labels"}
_TOKEN_COLUMNS = _BATCH_KEYS | {"completion_mask", "assistant_masks", "token_type_ids", "position_ids",
                                "seq_lengths", "special_tokens_mask"}
_OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "sgd": "sgd"}
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


class RecordingError(ValueError):
    """A one-line reason why this Hugging Face run cannot be recorded for exact unlearning."""


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def _refusals(trainer: Trainer) -> list[str]:
    """Every setting the replayer could not reproduce, as one-line reasons."""
    a = trainer.args
    out = []
    if a.world_size > 1 or a.n_gpu > 1:
        out.append(f"world_size={a.world_size}, n_gpu={a.n_gpu}: only single-process runs are recorded (per-rank "
                   "loss averaging and average_tokens_across_devices are not replayed); use one process, or "
                   "`lmcleaner train` under torchrun")
    if getattr(a, "deepspeed", None) or getattr(a, "fsdp", None):
        out.append("DeepSpeed/FSDP runs are not recorded (sharded optimizer states are not replayed)")
    if a.fp16:
        out.append("fp16=True: dynamic loss scaling skips steps the replayer cannot reproduce; use fp32 or bf16")
    if _value(a.optim) not in _OPTIMIZERS:
        out.append(f"optim={_value(a.optim)}: only {sorted(_OPTIMIZERS)} are replayed")
    extra = {k: v for k, v in _optim_args(a).items() if k != "momentum"}
    if extra:
        out.append(f"optim_args {extra}: only momentum (SGD) is replayed")
    if _value(a.lr_scheduler_type) not in _SCHEDULERS:
        out.append(f"lr_scheduler_type={_value(a.lr_scheduler_type)}: only {sorted(_SCHEDULERS)} are replayed")
    if a.lr_scheduler_kwargs:
        out.append(f"lr_scheduler_kwargs={a.lr_scheduler_kwargs}: scheduler options are not replayed")
    if a.label_smoothing_factor:
        out.append("label_smoothing_factor > 0: the replayed loss is the plain token NLL")
    if getattr(a, "neftune_noise_alpha", None):
        out.append("neftune_noise_alpha: embedding noise is not replayed")
    if a.torch_compile:
        out.append("torch_compile=True: compiled kernels are not bit-reproducible by the replayer")
    if a.load_best_model_at_end:
        out.append("load_best_model_at_end=True: unlearning applies to the last step's model, not a reloaded one")
    if a.auto_find_batch_size:
        out.append("auto_find_batch_size=True: the batch size must be fixed")
    strategy = getattr(a, "train_sampling_strategy", "random")
    if strategy != "random" or getattr(a, "group_by_length", False):
        out.append(f"train_sampling_strategy={strategy}: batches are drawn by lmcleaner's seeded sampler, so "
                   "length grouping / sequential / rebalanced batches cannot be honoured")
    if getattr(a, "packing", False):
        out.append("packing=True: packed rows mix samples, so a sample cannot be removed from a batch")
    if getattr(a, "padding_free", False):
        out.append("padding_free=True: padding-free batches are not replayed (padded batches are)")
    if getattr(a, "loss_type", "nll") != "nll":
        out.append(f"loss_type={a.loss_type}: only the token NLL loss is replayed")
    if trainer.compute_loss_func is not None:
        out.append("compute_loss_func: a custom loss is not replayed")
    if getattr(trainer, "model_init", None) is not None:
        out.append("model_init: hyper-parameter search is not recorded; pass the model")
    if trainer.optimizer is not None or trainer.lr_scheduler is not None:
        out.append("optimizers=(...): a user-built optimizer/scheduler is not replayed; set them in TrainingArguments")
    model = trainer.model
    if hasattr(model, "peft_config"):
        out.append("PEFT models are not recorded yet; use `lmcleaner train lora.enabled=true`")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        out.append(f"{len(frozen)} frozen parameters (e.g. {frozen[0]}): the replayer trains every parameter")
    ds = trainer.train_dataset
    if ds is None or isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__"):
        out.append("train_dataset must be a map-style dataset with a length (an iterable dataset cannot be replayed)")
    if trainer.processing_class is None or not hasattr(trainer.processing_class, "save_pretrained"):
        out.append("processing_class (the tokenizer) is required: it is saved with the base model for the replayer")
    return out


def _optim_args(a) -> dict[str, float]:
    if not a.optim_args:
        return {}
    out = {}
    for item in str(a.optim_args).replace(" ", "").split(","):
        if item:
            key, _, value = item.partition("=")
            out[key] = float(value) if value else 0.0
    return out


def _pad_id(tok) -> int:
    """The padding id the replayer's tokenizer will have (``load_tokenizer`` sets pad = eos when missing)."""
    for tid in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def _jsonable_columns(row: dict) -> dict[str, Any]:
    """The row's own fields (text, ids of the source), so deletion requests can name rows by content."""
    out = {}
    for k, v in row.items():
        if k in _TOKEN_COLUMNS:
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


class _Recording:
    """State shared by the mixin's overrides and :class:`TrajectoryCallback`."""

    def __init__(self, trainer: Trainer, raw_dataset: Any, record_dir: str | Path | None,
                 training_logger: dict | None, exclude_ids):
        self.trainer = trainer
        problems = _refusals(trainer)
        if problems:
            raise RecordingError(f"cannot record this run for exact unlearning: {problems[0]}"
                                 + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        a = trainer.args
        self.record_dir = Path(record_dir or Path(a.output_dir) / "lmcleaner").resolve()
        self.logger_overrides = dict(training_logger or {})
        self.excluded = frozenset(int(i) for i in exclude_ids)
        self.seed = int(a.data_seed if a.data_seed is not None else a.seed)
        self.rows = self._rows(raw_dataset)
        tok = trainer.processing_class
        self.dataset = TextDataset(self.rows, tok, max_length=self.max_length)
        self.dataset.pad_token_id = _pad_id(tok)
        bad = [i for i in self.excluded if not 0 <= i < len(self.dataset)]
        if bad:
            raise RecordingError(f"exclude_ids {sorted(bad)[:5]} are not training rows (0..{len(self.dataset) - 1})")
        self.plan = BatchPlan(len(self.dataset), a.per_device_train_batch_size, a.gradient_accumulation_steps, 1,
                              self.seed)
        self.collator = Collator(self.dataset.pad_token_id)
        self.engine: Engine | None = None
        self.config = None
        self.recorder = None
        self.in_step = False
        self.micro = 0
        self.state = None  # TrainState (history, checkpoints)
        self._step: dict[str, Any] = {}
        self._last_checkpoint = -1
        self._locks: list = []  # the record_dir's exclusive run lock while recording

    # ------------------------------------------------------------- data
    @property
    def max_length(self) -> int:
        return max(8, max(len(r["input_ids"]) for r in self.rows))

    def _rows(self, raw: Any) -> list[dict]:
        """Each training row through the script's own collator, alone (its masking, no padding)."""
        t = self.trainer
        ds, collate = t.train_dataset, t.data_collator
        try:
            import datasets

            if isinstance(ds, datasets.Dataset):
                ds = t._remove_unused_columns(ds, description="training")
            else:
                collate = t._get_collator_with_removed_columns(collate, description="training")
        except ImportError:
            collate = t._get_collator_with_removed_columns(collate, description="training")
        n = len(ds)
        same = raw is not None and hasattr(raw, "__len__") and not isinstance(raw, torch.utils.data.IterableDataset) \
            and len(raw) == n
        rows = []
        for i in range(n):
            original = raw[i] if same else None
            batch = collate([ds[i]])
            extra = sorted(set(batch) - _BATCH_KEYS)
            if extra:
                raise RecordingError(f"the data collator returns {extra}: only input_ids/attention_mask/labels "
                                     "batches are replayed (padding-free or packing collators are not)")
            if "labels" not in batch:
                raise RecordingError("the data collator returns no 'labels': use one that masks the loss "
                                     "(e.g. DataCollatorForLanguageModeling(mlm=False), DataCollatorForSeq2Seq)")
            ids, labels = torch.as_tensor(batch["input_ids"])[0], torch.as_tensor(batch["labels"])[0]
            if ids.shape != labels.shape:
                raise RecordingError(f"row {i}: the collator's labels and input_ids differ in shape")
            keep = torch.as_tensor(batch["attention_mask"])[0].bool() if "attention_mask" in batch else \
                torch.ones_like(ids, dtype=torch.bool)
            row = _jsonable_columns(original) if isinstance(original, dict) else {}
            row.update({"input_ids": ids[keep].tolist(), "labels": labels[keep].tolist()})
            rows.append(row)
        return rows

    def dataloader(self):
        return _PlanLoader(self)

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return self.collator([x for x in items if x["sample_id"] not in self.excluded])

    # ----------------------------------------------------------- config
    def build_config(self, max_steps: int):
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        from ..config import load_config
        from ..config.loader import ConfigError, validate

        t, a = self.trainer, self.trainer.args
        model = t.accelerator.unwrap_model(t.model)
        optim = _OPTIMIZERS[_value(a.optim)]
        sched = _SCHEDULERS[_value(a.lr_scheduler_type)]
        warmup = 0 if _value(a.lr_scheduler_type) == "constant" else a.get_warmup_steps(max_steps)
        named = [n for n, p in model.named_parameters() if p.requires_grad]
        no_decay = []
        if a.weight_decay:
            decay = set(t.get_decay_parameter_names(model))
            no_decay = [n for n in named if n not in decay]
        dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
        if len(dtypes) != 1:
            raise RecordingError(f"the model mixes parameter dtypes {sorted(dtypes)}; the replayer loads one dtype")
        training = {
            "dataset_name": str(self.record_dir / DATASET_FILE), "text_field": None, "num_samples": None,
            "max_length": self.max_length, "seed": self.seed,
            "num_epochs": max(1, math.ceil(max_steps / self.plan.steps_per_epoch)), "max_steps": max_steps,
            "batch_size": a.per_device_train_batch_size, "gradient_accumulation_steps": a.gradient_accumulation_steps,
            "learning_rate": a.learning_rate, "memory_lr": None, "lora_lr": None, "base_model_lr": None,
            "optimizer": optim, "momentum": _optim_args(a).get("momentum", 0.0),
            "adam_beta1": a.adam_beta1, "adam_beta2": a.adam_beta2, "adam_epsilon": a.adam_epsilon,
            "weight_decay": a.weight_decay, "weight_decay_exclude": no_decay,
            "max_grad_norm": float(a.max_grad_norm or 0.0), "scheduler": sched, "warmup_steps": warmup,
            "mixed_precision": "bf16" if a.bf16 else "no",
            "gradient_checkpointing": bool(a.activation_checkpointing if hasattr(a, "activation_checkpointing")
                                           else a.gradient_checkpointing),
            "save_steps": 0, "eval_steps": 0, "validation_dataset": None, "output_dir": str(self.record_dir),
            "exclude_ids": sorted(self.excluded), "forget_request_file": None, "resume_from_checkpoint": None,
            "logging_steps": 0, "torch_threads": torch.get_num_threads(),
        }
        base = str(self.record_dir / BASE_MODEL_DIR)
        recorded_from = {"trainer_class": next(c.__name__ for c in type(t).__mro__ if c is not _Mixin and
                                               not issubclass(c, _Mixin)),
                         "hf_output_dir": str(a.output_dir)}
        try:
            cfg = OmegaConf.merge(load_config(), {
                "model": {"name_or_path": base, "tokenizer": None, "trust_remote_code": False,
                          "attn_implementation": getattr(model.config, "_attn_implementation", None) or "eager",
                          "dtype": dtypes.pop()},
                "training": training,
                "training_logger": {"enabled": True, **self.logger_overrides},
                "extra": {"recorded_from": recorded_from},
            })
            validate(cfg)
        except ConfigError as err:
            raise RecordingError(f"training_logger: {err}") from None
        except OmegaConfBaseException as err:  # a user override OmegaConf rejects (unknown key, wrong type)
            raise RecordingError(f"bad training_logger override: {str(err).splitlines()[0]}") from None
        return cfg

    # ------------------------------------------------------------- train
    def begin(self) -> None:
        """Before the first step: check the target, write data + base model, start the recorder, theta_0."""
        from ..trajectory import TrainingLogger
        from ..trajectory.jsonl import TrajectoryLogError

        from ..train.runlock import lock_dirs

        t = self.trainer
        if ckpt.list_checkpoints(self.record_dir) or (self.record_dir / "training_log").exists():
            raise RecordingError(f"{self.record_dir} already holds a recorded run: pass another record_dir")
        self.config = self.build_config(int(t.state.max_steps))
        # one writer per run, as for `lmcleaner train` (a second one is refused, naming the holder's PID)
        self._locks = lock_dirs([self.record_dir], ["record_dir"])
        self._write_dataset()
        unwrapped = t.accelerator.unwrap_model(t.model)
        export_model(unwrapped, t.processing_class, self.record_dir / BASE_MODEL_DIR, self.config.model.dtype)
        self.engine = Engine(t.accelerator, t.model_wrapped, t.optimizer, t.lr_scheduler, self.dataset,
                             self.collator, self.config.training, self.seed)
        self.router = self.engine.router_aux  # MoE with router losses: part of the step loss, as in the engine
        self.state = TrainState(total_steps=int(t.state.max_steps))
        self.spec = optimizer_spec(getattr(t.optimizer, "optimizer", t.optimizer), self.config.training)
        lcfg = self.config.training_logger
        log_dir = Path(lcfg.log_dir) if lcfg.log_dir else self.record_dir / "training_log"
        self.recorder = TrainingLogger(lcfg, log_dir)
        try:
            self.recorder.on_train_begin(self.engine, run_meta(self.config, self.engine, self.spec,
                                                               self.state.total_steps, self.record_dir), 0)
        except TrajectoryLogError as err:
            raise RecordingError(str(err)) from None
        if self.recorder.wants_checkpoint(0):
            self.save_checkpoint(0, "recorder")
        log.warning("lmcleaner: recording to %s; this run uses lmcleaner's sampler (seed %d), right-padded batches, "
                    "loss sum(NLL)/supervised tokens per optimizer step and %s, so `lmcleaner unlearn "
                    "unlearn.model_dir=%s` replays it exactly", self.record_dir, self.seed,
                    self.config.training.optimizer, self.record_dir)

    def _write_dataset(self) -> None:
        """Pre-tokenised rows + original fields; falls back to tokens only if the fields do not round-trip."""
        path = self.record_dir / DATASET_FILE
        for rows in (self.rows, [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in self.rows]):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(path)
            try:
                again = TextDataset(load_records(str(path)), self.trainer.processing_class, max_length=self.max_length)
            except (ValueError, FormatError):
                continue
            if again.fingerprint == self.dataset.fingerprint:
                return
        raise RecordingError(f"{path}: the written dataset does not load back identically")

    def step_begin(self, inputs: dict) -> None:
        step = int(self.trainer.state.global_step)
        if self.micro == 0:
            mbs = self.plan.micro_batches(step)
            kept = [[i for i in mb if i not in self.excluded] for mb in mbs]
            self._step = {"step": step, "micro_batches": mbs, "kept": kept, "batches": [],
                          "normaliser": sum(self.engine.sup_counts[i] for mb in kept for i in mb),
                          "nll": torch.zeros((), dtype=torch.float64)}
            torch.manual_seed(step_seed(self.seed, step, 0))
            self.recorder.on_step_begin(self.engine, step, mbs)
        want = self._step["kept"][self.micro] or [-1]
        got = inputs["sample_ids"].tolist()
        if got != want:  # an internal invariant: the dataloader follows the plan
            raise RuntimeError(f"lmcleaner recorder: step {step} micro-batch {self.micro} holds {got}, "
                               f"the plan says {want}")
        self._step["batches"].append({k: v.detach().cpu() for k, v in inputs.items()})

    def loss(self, model, inputs) -> torch.Tensor:
        n_micro = sum(1 for mb in self._step["kept"] if mb)  # M+, as ``engine.run_step`` counts it
        loss, nll = micro_batch_loss(model, inputs, self.trainer.accelerator.device, self._step["normaliser"], 1,
                                     n_micro, self.router)
        self._step["nll"] += nll.detach().double().cpu()
        return loss

    def step_after_backward(self) -> None:
        self.micro += 1
        if self.micro == len(self._step["micro_batches"]):
            self.recorder.on_after_backward(self.engine, self._step["step"])

    def capture_norm(self, grad_norm) -> None:
        """Called where Hugging Face has the pre-clip norm, before ``optimizer.step()`` (applied LRs)."""
        self._step["grad_norm"] = float(grad_norm)
        self._step["lrs"] = self.engine.applied_lrs()

    def step_end(self) -> None:
        s, st = self._step["step"], self._step
        n = st["normaliser"]
        clip = self.config.training.max_grad_norm
        dropped = sorted({i for mb in st["micro_batches"] for i in mb} - {i for mb in st["kept"] for i in mb})
        record = StepRecord(step=s, epoch=self.plan.locate(s)[0],
                            micro_batches=[list(mb) for mb in st["micro_batches"]],
                            lrs=st["lrs"], normaliser=int(n), loss=float(st["nll"]) / n if n > 0 else 0.0,
                            grad_norm=st["grad_norm"], clipped=bool(clip > 0 and st["grad_norm"] > clip),
                            rng_seed=step_seed(self.seed, s, 0), excluded=dropped)
        self.recorder.on_step_end(self.engine, record, st["batches"])
        self.micro = 0
        self.state.step = s + 1
        self.state.epoch = record.epoch
        self.state.history.append({"step": s, "loss": record.loss, "lr": record.lrs[-1], "grad_norm": record.grad_norm})
        if self.state.step >= self.state.total_steps:
            self.save_checkpoint(self.state.step, "final")
        elif self.recorder.wants_checkpoint(self.state.step):
            self.save_checkpoint(self.state.step, "recorder")

    def save_checkpoint(self, step: int, reason: str) -> None:
        path = ckpt.checkpoint_dir(self.record_dir, step)
        self.state.checkpoint_reasons.setdefault(step, []).append(reason)
        trainer_state = {**self.state.to_json(), "config": _config_dict(self.config),
                         "dataset_fingerprint": self.dataset.fingerprint, "world_size": 1}
        ckpt.save_checkpoint(path, self.engine.trainable(), self.engine.optimizer, self.engine.scheduler, trainer_state)
        self.recorder.on_checkpoint(step, path)
        self._last_checkpoint = step
        keep = set(self.recorder.required_checkpoints(step)) | {step}
        for s, p in ckpt.list_checkpoints(self.record_dir).items():
            if s not in keep:
                shutil.rmtree(p, ignore_errors=True)
                self.state.checkpoint_reasons.pop(s, None)

    def end(self) -> None:
        """After the last step (also after early stopping): final checkpoint, model, state, close the log."""
        if self.recorder is None:
            return
        try:
            if self._last_checkpoint != self.state.step:
                self.save_checkpoint(self.state.step, "final")
            t = self.trainer
            export_model(t.accelerator.unwrap_model(t.model), t.processing_class, self.record_dir / "final_model",
                         self.config.model.dtype)
            ckpt.write_json_atomic(self.record_dir / "trainer_state.json",
                                   {**self.state.to_json(), "config": _config_dict(self.config),
                                    "dataset_fingerprint": self.dataset.fingerprint})
        finally:
            self.close()

    def close(self) -> None:
        try:
            if self.recorder is not None:
                recorder, self.recorder = self.recorder, None
                recorder.close()
        finally:
            for lk in self._locks:
                lk.release()
            self._locks = []


def _config_dict(cfg) -> dict:
    from ..config.loader import to_dict

    return to_dict(cfg)


class _PlanSampler(torch.utils.data.Sampler):
    """Micro-batches of one epoch in the plan's order (micro-step major), as a batch sampler."""

    def __init__(self, rec: _Recording):
        self.plan, self.epoch = rec.plan, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.plan.steps_per_epoch * self.plan.gradient_accumulation_steps

    def __iter__(self):
        spe = self.plan.steps_per_epoch
        for k in range(spe):
            yield from self.plan.micro_batches(self.epoch * spe + k)


class _PlanLoader(torch.utils.data.DataLoader):
    """A DataLoader over the recorded rows whose ``set_epoch`` (called by Hugging Face's loop) reaches the plan."""

    def __init__(self, rec: _Recording):
        super().__init__(rec.dataset, batch_sampler=_PlanSampler(rec), collate_fn=rec.collate, num_workers=0)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class TrajectoryCallback(TrainerCallback):
    """Writes the trajectory at Hugging Face's step boundaries; installed by :class:`LMCleanerRecorderMixin`.

    On its own (added to a plain ``Trainer``) it refuses to start: the sampler,
    loss and optimizer must be lmcleaner's for the log to be replayable.
    """

    def __init__(self, recording: _Recording | None = None):
        self.recording = recording

    def on_train_begin(self, args, state, control, **kwargs):
        if self.recording is None:
            raise RecordingError("TrajectoryCallback alone cannot make a run replayable: build the trainer with "
                                 "lmcleaner.integrations.recording(TrainerClass)(..., record_dir=...)")
        self.recording.begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.recording.step_end()

    def on_train_end(self, args, state, control, **kwargs):
        self.recording.end()


class LMCleanerRecorderMixin:
    """Mix into any ``transformers.Trainer`` subclass (put it first) to record an exactly replayable trajectory.

    Extra keyword arguments: ``record_dir`` (default ``<args.output_dir>/lmcleaner``; must not hold a
    recorded run), ``training_logger`` (overrides of the ``training_logger`` config block, e.g.
    ``{"checkpoint_interval": 10, "storage": "light"}``) and ``exclude_ids`` (rows removed from every
    batch: the exact-retrain counterfactual of the same script).
    """

    def __init__(self, *args, record_dir: str | Path | None = None, training_logger: dict | None = None,
                 exclude_ids=(), **kwargs):
        raw = kwargs.get("train_dataset")
        super().__init__(*args, **kwargs)
        self._lmc = _Recording(self, raw, record_dir, training_logger, exclude_ids)
        self.loss_is_scaled_for_ga = True  # our loss is already normalised over the whole optimizer step
        self.add_callback(TrajectoryCallback(self._lmc))

    @property
    def record_dir(self) -> Path:
        return self._lmc.record_dir

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            raise RecordingError("resume_from_checkpoint: resuming a recorded Hugging Face run is not supported; "
                                 "start a new record_dir")
        try:
            return super().train(None, *args, **kwargs)
        except BaseException:
            self._lmc.close()  # the log stays valid up to the last flushed step
            raise

    def get_train_dataloader(self):
        return self._lmc.dataloader()

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            named = {n: p for n, p in (model or self.model).named_parameters() if p.requires_grad}
            self.optimizer = build_optimizer(named, self._lmc.build_config(1).training)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            t = self._lmc.build_config(num_training_steps).training
            self.lr_scheduler = build_scheduler(optimizer or self.optimizer, t, num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        rec = self._lmc
        rec.step_begin(inputs)
        rec.in_step = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            rec.in_step = False
        rec.step_after_backward()
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._lmc.in_step:  # evaluation / prediction: the script's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss = self._lmc.loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._lmc.capture_norm(grad_norm)
        return grad_norm


_Mixin = LMCleanerRecorderMixin


@functools.cache
def recording(trainer_cls: type) -> type:
    """``trainer_cls`` with the recorder mixed in, e.g. ``recording(trl.SFTTrainer)(..., record_dir=...)``."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"recording() needs a transformers.Trainer subclass, got {trainer_cls!r}")
    for name in ("_get_grad_norm", "training_step", "compute_loss", "create_scheduler", "get_train_dataloader",
                 "loss_is_scaled_for_ga"):  # without the last, the Trainer divides our step loss by the accumulation
        if not hasattr(trainer_cls, name):
            raise RecordingError(f"{trainer_cls.__name__} has no {name}(): this transformers version is not supported "
                                 "by the recorder (tested with transformers 5.x)")
    return type(f"Recording{trainer_cls.__name__}", (LMCleanerRecorderMixin, trainer_cls),
                {"__doc__": f"{trainer_cls.__name__} recording an lmcleaner trajectory (see lmcleaner.integrations)."})


RecordingTrainer = recording(Trainer)
