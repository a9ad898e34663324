"""``lmcleaner plan`` against measured runs of the tiny models, and the known-model table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmcleaner.cli.main import main
from lmcleaner.config import load_config
from lmcleaner.plan.estimate import make_plan, measured_seq_len
from lmcleaner.plan.known import KNOWN_CONFIGS, PUBLISHED_PARAMETERS
from lmcleaner.plan.shapes import model_shape
from lmcleaner.train import Trainer
from lmcleaner.unlearn.session import UnlearnSession

BASE = ["model=micro-llama", "training.num_samples=48", "training.batch_size=4", "training.max_steps=12",
        "training.progress_bar=false", "training.logging_steps=0", "training.torch_threads=1",
        "training_logger.checkpoint_interval=4"]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _close(planned: float, measured: float, tol: float = 0.10) -> bool:
    return abs(planned - measured) <= tol * measured


@pytest.mark.parametrize("extra", [[], ["lora.enabled=true", "lora.r=4", "training_logger.storage=heavy"]],
                         ids=["full-light", "lora-heavy"])
def test_plan_matches_measured_storage_and_costs(tmp_path, extra):
    torch.set_num_threads(1)
    cfg = load_config(overrides=[*BASE, *extra, f"training.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    # the mean padded width of the micro-batches is the plan's --seq-len (a property of the data)
    seq_len = measured_seq_len(trainer)
    trainer.train()
    run = tmp_path / "run"
    shape = model_shape(cfg.model, cfg.lora)
    assert shape.trainable_parameters == sum(p.numel() for p in trainer.engine.trainable().values())
    s = UnlearnSession(run)
    sample, t_z = s.log.record(5).sample_ids[0], 5  # one epoch: every sample is used once
    plan = make_plan(cfg, shape, 48, ages=[12 - t_z], seq_len=seq_len)
    st = plan["storage"]
    measured = {
        "one checkpoint": (st["checkpoint"]["total"], _size(run / "checkpoint-12")),
        "checkpoints": (st["checkpoints_total"], sum(_size(run / f"checkpoint-{k}") for k in st["checkpoints_kept"])),
        "log": (st["log"]["total"], _size(run / "training_log")),
    }
    assert st["checkpoints_kept"] == sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    bad = {k: v for k, v in measured.items() if not _close(*v)}
    assert not bad, bad
    if extra:  # only the adapter is stored: weights are a small fraction of the model
        assert st["checkpoint"]["weights"] < 0.2 * shape.parameters * 4
    req = plan["requests"][0]
    replay = s.run("replay", [sample])
    assert _close(req["replay"]["grad_equivalents"], replay.info["grad_equivalents_total"])
    lmc = s.run("LMCleanerSampleLevel", [sample], K=3, hessian_mode="exact")
    plan_k3 = make_plan(load_config(overrides=[*BASE, *extra, "trainer.method_args.K=3",
                                               f"training.output_dir={run}"]), shape, 48, ages=[12 - t_z])
    assert _close(plan_k3["requests"][0]["lmcleaner"]["grad_equivalents"], lmc.info["grad_equivalents_total"])
    assert plan_k3["requests"][0]["lmcleaner"]["hvp_directions"] == lmc.info["n_hvp_vectors"]


def test_known_models_have_their_published_sizes():
    cfg = load_config()
    for name in KNOWN_CONFIGS:
        cfg.model.name_or_path = name
        assert model_shape(cfg.model, cfg.lora).parameters == PUBLISHED_PARAMETERS[name], name


def test_plan_cli_json_and_table_for_llama_1b(capsys):
    args = ["plan", "--model", "Llama-3.2-1B", "--samples", "10000", "training.batch_size=4",
            "training.gradient_accumulation_steps=8", "training.max_steps=2000", "training_logger.max_steps=1000"]
    assert main([*args, "--json", "--age", "20", "1500"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["name"] == "meta-llama/Llama-3.2-1B"
    # fp32 weights + AdamW m and v: 12 bytes per parameter (the "about 16 GB per checkpoint")
    assert abs(plan["storage"]["checkpoint"]["total"] / (12 * 1_235_814_400) - 1) < 0.001
    assert plan["requests"][0]["replay"]["grad_equivalents"] == 50  # from checkpoint 1950 to 2000
    assert plan["requests"][1]["in_window"] is False  # older than the 1000-step window
    assert main(["plan", "lora.enabled=true", *args[1:], "lora.r=16"]) == 0  # options and overrides intermixed
    table = capsys.readouterr().out
    assert "1,703,936 in 64 tensors (LoRA r=16)" in table and "one checkpoint" in table


def test_plan_errors_are_one_line(capsys, monkeypatch, tmp_path):
    import transformers

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)  # as on a machine without the hub
    assert main(["plan", "--model", "some-org/some-model", "--samples", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "known models" in err and "config.json" in err
    assert main(["plan", "--model", str(tmp_path / "missing.json"), "--samples", "10"]) == 2
    assert "not found" in capsys.readouterr().err
