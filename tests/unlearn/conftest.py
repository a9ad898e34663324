"""Shared fixtures: trained tiny models with recorded trajectories and cached exact retrains."""

from __future__ import annotations

import contextlib
import warnings
from functools import lru_cache

import pytest
import torch

from .unlearn_harness import OptCfg, Run, TinyMLPLM, make_dataset, make_schedule, tiny_llama, train


@contextlib.contextmanager
def one_thread():
    """Tiny models: intra-op threads only add sync overhead, and on a loaded 2-core
    machine they made a sweep 15x slower (measured). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def single_thread():
    """Used by the test_unlearn_* modules only (pytestmark): other tests in this folder
    replay recorded runs and must keep the thread count they were recorded with."""
    with one_thread(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
        yield


class Setup:
    """A recorded training run plus its exact retrains (cached)."""

    def __init__(self, model_fn, n: int, epochs: int, cfg: OptCfg) -> None:
        self.model_fn, self.cfg = model_fn, cfg
        self.data = make_dataset(n)
        self.schedule = make_schedule(n, epochs)
        self.tau = len(self.schedule)
        with one_thread():
            self.run: Run = train(model_fn, self.data, self.schedule, cfg, record=True)
        self.spec = self.run.spec
        self.steps = self.run.steps
        self.model = model_fn()
        self.retrain = lru_cache(maxsize=None)(self._retrain)

    def _retrain(self, forget: frozenset = frozenset(), zero_steps: frozenset = frozenset(),
                 n_steps: int | None = None) -> Run:
        with one_thread():
            return train(self.model_fn, self.data, self.schedule, self.cfg, forget=set(forget),
                         zero_steps=set(zero_steps), n_steps=n_steps)

    def prefix(self, n_steps: int) -> Run:
        return self.retrain(frozenset(), frozenset(), n_steps)


MLP_SGD = OptCfg(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01)
MLP_ADAMW = OptCfg(name="adamw", lr=0.01, weight_decay=0.01, max_grad_norm=0.55)
LLAMA_SGD = OptCfg(name="sgd", lr=0.02, momentum=0.9, weight_decay=0.01)
LLAMA_ADAMW = OptCfg(name="adamw", lr=0.002, weight_decay=0.01, max_grad_norm=1.5)


@pytest.fixture(scope="session")
def mlp_sgd() -> Setup:
    return Setup(lambda: TinyMLPLM(), 64, 3, MLP_SGD)


@pytest.fixture(scope="session")
def mlp_adamw() -> Setup:
    return Setup(lambda: TinyMLPLM(), 64, 3, MLP_ADAMW)


@pytest.fixture(scope="session")
def llama_sgd() -> Setup:
    return Setup(lambda: tiny_llama(), 32, 3, LLAMA_SGD)


@pytest.fixture(scope="session")
def llama_adamw() -> Setup:
    return Setup(lambda: tiny_llama(), 32, 3, LLAMA_ADAMW)


RECORDED_RUN = ["model=micro-llama", "training.num_samples=48", "training.batch_size=4", "training.max_steps=24",
                "training.progress_bar=false", "training.logging_steps=0", "training.optimizer=adamw",
                "training.learning_rate=3e-3", "training.max_grad_norm=0.5", "training_logger.checkpoint_interval=8",
                "training.torch_threads=1"]


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory):
    """A real ``lmcleaner`` run with its trajectory log (micro Llama, 24 AdamW steps, ~1 s)."""
    from lmcleaner.config import load_config
    from lmcleaner.train import Trainer

    root = tmp_path_factory.mktemp("recorded") / "run"
    Trainer(load_config(overrides=[*RECORDED_RUN, f"training.output_dir={root}"])).train()
    return root
