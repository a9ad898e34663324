"""The training-trajectory recorder, its on-disk format, batch reconstruction and replay (DESIGN §2).

Record (the trainer builds it from ``training_logger.*``)::

    Trainer(load_config(overrides=["training_logger.storage=light"])).train()

Read and replay::

    log = TrajectoryLog("outputs/run/training_log")          # strict; tolerant=True after a crash
    log.sample_uses(17)                                       # [SampleUse(step, micro_batch, position)]
    for st in TrajectoryReplayer(log).iter_steps(10, 20):     # ReplayedStep: theta_t, opt state, batches, grad
        ...
    log.params_at(12)                                         # heavy mode: theta_12 without replay
    log.diag(12)                                              # diag mode: diagonal curvature at theta_12
"""

# Exports are resolved lazily (PEP 562): ``train.engine`` imports ``trajectory.types``
# while ``trajectory.logger`` imports ``train``; eager imports here would be circular,
# and ``lmcleaner --help`` must not import torch.
from ..lazy import lazy_exports

_EXPORTS = {
    "OptimizerSpec": "types", "ParamGroupSpec": "types", "ReplayedStep": "types", "StepRecord": "types",
    "TrajectoryLogError": "jsonl",
    "FORMAT_VERSION": "layout", "run_fingerprint": "layout",
    "FollowerRecorder": "logger", "RecorderStats": "logger", "TrainingLogger": "logger",
    "SampleUse": "reader", "TailProblem": "reader", "TailReport": "reader", "TrajectoryLog": "reader",
    "BatchReconstructor": "reconstruct", "build_trainer": "reconstruct",
    "CounterfactualResult": "replay", "ReplayMismatchError": "replay", "TrajectoryReplayer": "replay",
    "RestorePoint": "restore",
    "RecorderSettings": "settings", "resolve_settings": "settings",
    "apply_update": "updates", "encode_update": "updates",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
