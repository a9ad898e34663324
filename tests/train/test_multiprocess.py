"""Two real ranks over gloo (torchrun) match one process with accumulation."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcleaner.train import Trainer

from ..conftest import FAST, tiny_config, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "two_rank_train.py"
COMMON = ["training.max_steps=6", "training.batch_size=4", "training.max_grad_norm=1.0"]


@pytest.mark.slow
def test_two_ranks_equal_single_process_with_accumulation(tmp_path):
    torchrun(SCRIPT, [str(tmp_path), *FAST, *COMMON], port=29517, timeout=300)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == 2 and "MULTI_CPU" in result["distributed_type"]
    # Same global batch in one process: 2 micro-batches of 4, accumulated.
    single = Trainer(tiny_config(tmp_path / "single", *COMMON, "training.gradient_accumulation_steps=2"))
    state = single.train()
    assert result["losses"] == pytest.approx([h["loss"] for h in state.history], rel=1e-5, abs=1e-6)
    w2 = load_file(str(tmp_path / "weights.safetensors"))
    for name, p in single.engine.trainable().items():
        torch.testing.assert_close(w2[name], p.detach(), rtol=1e-4, atol=1e-5)
