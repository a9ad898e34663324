"""The training engine on Accelerate."""

# Exports are resolved lazily (PEP 562): ``lmcleaner --help`` imports the subcommand modules
# that live here (``train.cli_pretrain``), and importing this package must not import torch.
from ..lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "checkpoint", "list_checkpoints": "checkpoint", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "Engine": "engine", "NullObserver": "engine", "run_step": "engine", "step_seed": "engine",
    "export_model": "export",
    "NullRecorder": "hooks",
    "IGNORE_INDEX": "loss", "count_supervised": "loss", "per_sample_nll": "loss", "token_nll_sum": "loss",
    "build_model": "model",
    "build_optimizer": "optim", "build_scheduler": "optim", "optimizer_spec": "optim",
    "compute_router_auxiliary_loss": "router",
    "TrainState": "state",
    "Trainer": "trainer", "TrainingError": "trainer",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
