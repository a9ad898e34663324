"""Turn the user's ``training_logger`` block into what the recorder actually does.

Why a separate step: the config keeps the original system's names
(``save_batch_data``, ``save_indices_only``, ``compute_diag_h`` …) and the
``storage`` preset; resolving them once, with one-line errors, keeps the
recorder free of flag juggling.

Presets (``training_logger.storage``):

- ``light`` (default): per-step records + the trainer's checkpoints every
  ``checkpoint_interval`` steps, kept for the window; past parameters by replay.
- ``heavy``: light + per-step batch tensors + per-step update vectors
  ``u_t = theta_{t+1} - theta_t`` (``tensor_dtype``), so past parameters need
  neither the dataset nor a replay.
- ``diag``: light + a per-step diagonal curvature estimate (``diag_estimator``).

Flags add to a preset: ``compute_diag_h=true`` turns the diagonal on,
``save_batch_data=true`` (or ``save_indices_only=false``) stores batch tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .jsonl import TrajectoryLogError

STORAGES = ("light", "heavy", "diag")
MODES = ("batch", "sample")
DIAG_ESTIMATORS = ("hutchinson", "empirical_fisher")
TENSOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RecorderSettings:
    storage: str = "light"
    mode: str = "batch"  # the default unlearning level for this log (batch | sample); recorded in meta
    window: int = 1000  # steps for which past parameters stay recoverable
    save_interval: int = 10  # flush every N steps
    checkpoint_interval: int = 20  # C: spacing of the trainer checkpoints the recorder asks for
    store_batches: bool = False
    store_updates: bool = False
    diag_estimator: str | None = None  # None: no curvature
    diag_probes: int = 1
    save_rng_state: bool = True
    tensor_dtype: str = "float32"
    batch_size_at_training: int | None = None
    fsync: bool = False  # power-loss durability; kill -9 safety needs none (see writer)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TENSOR_DTYPES[self.tensor_dtype]

    @property
    def exact_updates(self) -> bool:
        """Update vectors reproduce parameters bit for bit only when stored in float32."""
        return self.tensor_dtype == "float32"

    @property
    def needs_snapshot(self) -> bool:
        return self.store_updates or self.diag_estimator == "hutchinson"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def resolve_settings(cfg: Any) -> RecorderSettings:
    """``TrainingLoggerConfig`` (or a dict of it) -> :class:`RecorderSettings`."""
    storage = _get(cfg, "storage", "light")
    if storage not in STORAGES:
        raise TrajectoryLogError(f"unknown training_logger.storage '{storage}': choose one of {list(STORAGES)}")
    mode = _get(cfg, "mode", "batch")
    if mode not in MODES:
        raise TrajectoryLogError(f"unknown training_logger.mode '{mode}': choose one of {list(MODES)}")
    window = int(_get(cfg, "max_steps", 1000))
    if window < 1:
        raise TrajectoryLogError(f"training_logger.max_steps={window}: the window must be >= 1 step")
    save_interval = int(_get(cfg, "save_interval", 10))
    if save_interval < 1:
        raise TrajectoryLogError(f"training_logger.save_interval={save_interval}: flush at least every step (>= 1)")
    interval = int(_get(cfg, "checkpoint_interval", 20))
    if interval < 1:
        raise TrajectoryLogError("training_logger.checkpoint_interval must be >= 1")
    dtype = str(_get(cfg, "tensor_dtype", "float32"))
    if dtype not in TENSOR_DTYPES:
        raise TrajectoryLogError(f"unknown training_logger.tensor_dtype '{dtype}': choose one of {list(TENSOR_DTYPES)}")
    estimator = str(_get(cfg, "diag_estimator", "hutchinson"))
    if estimator not in DIAG_ESTIMATORS:
        raise TrajectoryLogError(
            f"unknown training_logger.diag_estimator '{estimator}': choose one of {list(DIAG_ESTIMATORS)}")
    probes = int(_get(cfg, "diag_probes", 1))
    if probes < 1:
        raise TrajectoryLogError(f"training_logger.diag_probes={probes}: use at least 1 probe")
    heavy = storage == "heavy"
    store_batches = heavy or bool(_get(cfg, "save_batch_data", False)) or not bool(_get(cfg, "save_indices_only", True))
    diag = storage == "diag" or bool(_get(cfg, "compute_diag_h", False))
    bsat = _get(cfg, "batch_size_at_training", None)
    return RecorderSettings(
        storage=storage, mode=mode, window=window, save_interval=save_interval, checkpoint_interval=interval,
        store_batches=store_batches, store_updates=heavy, diag_estimator=estimator if diag else None,
        diag_probes=probes, save_rng_state=bool(_get(cfg, "save_rng_state", True)), tensor_dtype=dtype,
        batch_size_at_training=int(bsat) if bsat is not None else None,
    )
