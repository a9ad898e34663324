"""lmcleaner: fine-tune causal LMs while recording the trajectory, then unlearn.

Python API::

    import lmcleaner
    config = lmcleaner.load_config("x.yaml", ["training.max_steps=50"])
    lmcleaner.Trainer(config).train()
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import load_config

__all__ = ["__version__", "load_config", "Trainer"]


def __getattr__(name: str):
    # The trainer pulls in torch/transformers; keep `import lmcleaner` light.
    if name == "Trainer":
        from .train import Trainer

        return Trainer
    raise AttributeError(name)
