"""The training engine on Accelerate."""

from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from .engine import Engine, NullObserver, run_step, step_seed
from .export import export_model
from .hooks import NullRecorder
from .loss import IGNORE_INDEX, count_supervised, per_sample_nll, token_nll_sum
from .model import build_model
from .optim import build_optimizer, build_scheduler, optimizer_spec
from .router import compute_router_auxiliary_loss
from .state import TrainState
from .trainer import Trainer, TrainingError

__all__ = [
    "CheckpointError", "list_checkpoints", "load_checkpoint", "save_checkpoint", "Engine", "NullObserver",
    "run_step", "step_seed", "export_model", "NullRecorder", "IGNORE_INDEX", "count_supervised",
    "per_sample_nll", "token_nll_sum", "build_model", "build_optimizer", "build_scheduler", "optimizer_spec",
    "compute_router_auxiliary_loss", "TrainState", "Trainer", "TrainingError",
]
