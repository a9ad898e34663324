"""Resuming mid-epoch gives the bit-identical run (torchtune-style exact check)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmcleaner.train import CheckpointError, Trainer, list_checkpoints

from ..conftest import tiny_config

SETUP = ["training.max_steps=14", "training.gradient_accumulation_steps=2", "training.max_grad_norm=0.05",
         "training.save_steps=5", "training.num_samples=40"]  # 5 steps/epoch: step 5 and 10 are mid-run


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_is_bit_exact(tmp_path, optimizer):
    full_cfg = tiny_config(tmp_path / "a", *SETUP, f"training.optimizer={optimizer}")
    full = Trainer(full_cfg).train()
    assert any(h["grad_norm"] > 0.05 for h in full.history), "clipping must be active"
    # a crashed run: only checkpoint-7 survived (mid-epoch: epoch 1, step 2 of 5)
    run_a = tmp_path / "a" / "run"
    assert set(list_checkpoints(run_a)) >= {5, 10, 14}
    resumed_dir = tmp_path / "b" / "run"
    shutil.copytree(run_a / "checkpoint-5", resumed_dir / "checkpoint-5")
    cfg = tiny_config(tmp_path / "b", *SETUP, f"training.optimizer={optimizer}",
                      "training.resume_from_checkpoint=latest")
    resumed = Trainer(cfg).train()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    wa = load_file(str(run_a / "final_model" / "model.safetensors"))
    wb = load_file(str(resumed_dir / "final_model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(tiny_config(tmp_path, f"training.resume_from_checkpoint={tmp_path / 'nothing'}"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(tiny_config(tmp_path, "training.resume_from_checkpoint=latest"))


def test_refuses_to_overwrite_a_run(tmp_path):
    from lmcleaner.train import TrainingError

    Trainer(tiny_config(tmp_path, "training.max_steps=2")).train()
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        Trainer(tiny_config(tmp_path, "training.max_steps=2")).train()
