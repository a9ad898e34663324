"""Rebuild what a recorded step used, from the dataset and the recorded ids.

Why: light mode stores ids, not tensors. Because sample ids are dataset row
indices and the collator is deterministic, the exact tensors of any step can
be rebuilt; the dataset fingerprint in ``meta.json`` guarantees it is the same
data. ``build_trainer`` rebuilds the whole engine (model, optimizer,
scheduler, dataset, collator) from ``meta.json`` for replay.

The recorded config is someone else's data (``config.received``): its
``trust_remote_code``, telemetry YAML, W&B and request-file settings are
never honoured; only the caller's ``trust_remote_code`` argument (the
current user's ``--trust-remote-code``) lets a model run its own code.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from .jsonl import TrajectoryLogError
from .reader import TrajectoryLog
from .types import StepRecord
from .writer import kept_micro_batches


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Building a Trainer re-seeds every RNG; keep the caller's (e.g. a live training run)."""
    t, p, n = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(t)
        random.setstate(p)
        np.random.set_state(n)


def replay_config(log: TrajectoryLog, trust_remote_code: bool = False):
    """The run's config, made safe to rebuild in-process (no resume, no recorder, quiet,
    nothing from the run that could execute code unless the caller trusts it), for this
    launch's world size: a run recorded on N ranks replays at N ranks bit for bit, or with
    fewer processes (one) whose accumulation makes up the same global batch (float tolerance)."""
    from ..config.received import as_received
    from ..train.distributed import same_global_batch

    cfg = as_received(log.config(), trust_remote_code)
    same_global_batch(cfg.training, int(log.meta.get("world_size", 1)))
    cfg.training.progress_bar = False
    cfg.training.logging_steps = 0
    return cfg


def build_trainer(log: TrajectoryLog, model: torch.nn.Module | None = None, tokenizer: Any = None,
                  trust_remote_code: bool = False):
    """A ``Trainer`` identical to the recorded one (engine only; nothing is written).

    Raises a one-line error when the data or the model differ from the recorded ones.
    """
    from ..train.hooks import NullRecorder
    from ..train.trainer import Trainer, model_fingerprint

    with preserved_rng():
        trainer = Trainer(replay_config(log, trust_remote_code), model=model, tokenizer=tokenizer,
                          recorder=NullRecorder())
    _check_dataset(log, trainer.dataset)
    fp = model_fingerprint(trainer.engine.trainable())
    if fp != log.meta.get("model_fingerprint"):
        raise TrajectoryLogError(f"{log.log_dir}: the rebuilt model differs from the recorded one "
                                 f"(model fingerprint {fp} != {log.meta.get('model_fingerprint')})")
    return trainer


def _check_dataset(log: TrajectoryLog, dataset) -> None:
    fp = getattr(dataset, "fingerprint", None)
    if fp != log.meta.get("dataset_fingerprint"):
        raise TrajectoryLogError(f"{log.log_dir}: the dataset differs from the recorded one (fingerprint {fp} != "
                                 f"{log.meta.get('dataset_fingerprint')}); check training.dataset_name/num_samples")


class BatchReconstructor:
    """Exact batch tensors of recorded steps from dataset + ids + collator."""

    def __init__(self, log: TrajectoryLog, dataset, collator):
        _check_dataset(log, dataset)
        self.log, self.dataset, self.collator = log, dataset, collator

    @classmethod
    def from_log(cls, log: TrajectoryLog | str, tokenizer: Any = None,
                 trust_remote_code: bool = False) -> "BatchReconstructor":
        """Load the recorded dataset (tokenizer, template, max_length from ``meta.json``)."""
        from ..data import Collator, build_dataset, load_tokenizer

        log = log if isinstance(log, TrajectoryLog) else TrajectoryLog(log)
        cfg = replay_config(log, trust_remote_code)
        tok = tokenizer or load_tokenizer(cfg.model.tokenizer, cfg.model.name_or_path, trust_remote_code)
        ds = build_dataset(cfg.training, tok)
        return cls(log, ds, Collator(ds.pad_token_id))

    def micro_batch_ids(self, step: int | StepRecord) -> list[list[int]]:
        """Ids each micro-batch trained on (recorded order, excluded ids removed)."""
        rec = step if isinstance(step, StepRecord) else self.log.record(step)
        return kept_micro_batches(rec)

    def batches(self, step: int | StepRecord) -> list[dict[str, torch.Tensor]]:
        """Collated micro-batches of a step (all ranks, micro-step major), as the step saw them."""
        return [self.collator([self.dataset[i] for i in ids]) for ids in self.micro_batch_ids(step)]
