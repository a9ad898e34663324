"""Helpers for the recorder tests: tiny runs with the recorder on, and a recorder
that also keeps what the run really computed (on CPU) to compare replays with."""

from __future__ import annotations

from pathlib import Path

import torch

from lmcleaner.train import Trainer
from lmcleaner.trajectory import TrainingLogger

from ..conftest import tiny_config

# micro-llama, 48 samples, batch 4 (see tests/conftest.py); recorder on.
REC = ["training_logger.enabled=true", "training_logger.save_interval=4", "training_logger.checkpoint_interval=5"]
# AdamW with accumulation and clipping that is active on most steps.
ADAMW = ["training.optimizer=adamw", "training.gradient_accumulation_steps=2", "training.max_grad_norm=0.05",
         "training.weight_decay=0.01", "training.warmup_steps=2", "training.scheduler=linear"]
SGD = ["training.optimizer=sgd", "training.momentum=0.9", "training.learning_rate=0.05", "training.max_grad_norm=0.5",
       "training.weight_decay=0.01"]


def rec_config(root: Path, *overrides: str):
    return tiny_config(root, *REC, *overrides)


def log_dir_of(cfg) -> Path:
    return Path(cfg.training.output_dir) / "training_log"


def opt_state_by_name(engine) -> dict[str, dict[str, torch.Tensor]]:
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out = {}
    for n, p in engine.trainable().items():
        out[n] = {k: v.detach().clone() for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}
    return out


class CapturingLogger(TrainingLogger):
    """The real recorder, plus copies of theta_t, optimizer state, gradient and batches per step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.opt: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.seen_batches: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.lr_before: dict[int, list[float]] = {}
        self.final: dict[str, torch.Tensor] = {}
        self.step_end_hook = None

    def on_step_begin(self, engine, step, micro_batches):
        self.params[step] = {n: p.detach().clone() for n, p in engine.trainable().items()}
        self.opt[step] = opt_state_by_name(engine)
        self.lr_before[step] = [float(g["lr"]) for g in engine.optimizer.param_groups]
        super().on_step_begin(engine, step, micro_batches)

    def on_after_backward(self, engine, step):
        self.grads[step] = {n: p.grad.detach().clone() for n, p in engine.trainable().items()}
        super().on_after_backward(engine, step)

    def on_step_end(self, engine, record, batches):
        self.seen_batches[record.step] = [{k: v.clone() for k, v in b.items()} for b in batches]
        self.final = {n: p.detach().clone() for n, p in engine.trainable().items()}
        super().on_step_end(engine, record, batches)
        if self.step_end_hook is not None:
            self.step_end_hook(record)


def train_capturing(cfg, **trainer_kwargs) -> tuple[Trainer, CapturingLogger]:
    rec = CapturingLogger(cfg.training_logger, log_dir_of(cfg))
    trainer = Trainer(cfg, recorder=rec, **trainer_kwargs)
    trainer.train()
    return trainer, rec


def equal_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
