"""LoRA runs: storage and curvature cover only the adapter; the unlearned adapter loads with peft."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmcleaner.cli.main import main
from lmcleaner.config import ConfigError, load_config
from lmcleaner.data import load_tokenizer
from lmcleaner.train import Trainer
from lmcleaner.train.checkpoint import list_checkpoints
from lmcleaner.train.model import build_model
from lmcleaner.unlearn.hvp.exact import ExactHVP
from lmcleaner.unlearn.session import UnlearnSession

RUN = ["model=micro-llama", "lora.enabled=true", "lora.r=4", "lora.alpha=8", "training.num_samples=32",
       "training.batch_size=4", "training.max_steps=12", "training.learning_rate=1e-2", "training.progress_bar=false",
       "training.logging_steps=0", "training.torch_threads=1", "training_logger.checkpoint_interval=4"]
FORGET = [3, 17]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg = load_config(overrides=[*RUN, f"training.output_dir={root / 'run'}"])
    trainer = Trainer(cfg)
    adapter = {n: p.numel() for n, p in trainer.engine.trainable().items()}
    total = sum(p.numel() for p in trainer.engine.unwrapped.parameters())
    trainer.train()
    return cfg, root / "run", adapter, total


def test_lora_storage_and_hvps_cover_only_the_adapter(lora_run, monkeypatch):
    _, run_dir, adapter, total = lora_run
    n_adapter = sum(adapter.values())
    assert all("lora_" in n for n in adapter) and n_adapter < total / 10
    ckpts = list_checkpoints(run_dir)
    assert sorted(ckpts) == [0, 4, 8, 12]
    for step, path in ckpts.items():
        weights = load_file(str(path / "model.safetensors"))
        assert set(weights) == set(adapter) and sum(t.numel() for t in weights.values()) == n_adapter
        state = load_file(str(path / "optimizer.safetensors"))
        moments = {k: t for k, t in state.items() if not k.endswith("::step")}
        assert {k.split("::")[0] for k in state} <= set(adapter)
        assert sum(t.numel() for t in moments.values()) == (2 * n_adapter if step > 0 else 0)  # AdamW m, v
    meta = json.loads((run_dir / "training_log" / "meta.json").read_text())
    assert set(meta["param_shapes"]) == set(adapter)

    seen: list[int] = []
    original = ExactHVP._hvp

    def spy(self, params, batches, normaliser, vectors, step):
        seen.append(sum(v[0].numel() for v in vectors.values()))
        assert set(params) == set(adapter)
        return original(self, params, batches, normaliser, vectors, step)

    monkeypatch.setattr(ExactHVP, "_hvp", spy)
    torch.set_num_threads(1)
    res = UnlearnSession(run_dir).run("LMCleanerSampleLevel", FORGET, K=3, hessian_mode="exact")
    assert seen and set(seen) == {n_adapter}  # every HVP direction is an adapter-sized vector
    assert set(res.params) == set(adapter)


def test_unlearned_adapter_loads_onto_the_base_with_peft(lora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, run_dir, adapter, _ = lora_run
    out = tmp_path / "adapter"
    rc = main(["unlearn", "trainer=replay", f"unlearn.model_dir={run_dir}", "unlearn.forget=3,17",
               f"unlearn.output_dir={out}", "unlearn.export=adapter"])
    assert rc == 0, capsys.readouterr().err
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()
    stored = load_file(str(out / "adapter_model.safetensors"))
    assert sum(t.numel() for t in stored.values()) == sum(adapter.values())
    audit = json.loads((out / "audit" / "audit_records.json").read_text())
    assert audit[-1]["export"] == "adapter"

    # the same request written merged: both must be the same model
    s = UnlearnSession(run_dir)
    merged_dir = tmp_path / "merged"
    s.save(s.run("replay", FORGET), merged_dir, export="merged")
    tok = load_tokenizer(cfg.model.tokenizer, cfg.model.name_or_path)
    base = build_model(cfg.model, tok, cfg.training.seed)  # the base the run was trained on (seeded)
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    ids = torch.tensor([tok("Question: who wrote it?\nAnswer:")["input_ids"]])
    with torch.no_grad():
        a, b = loaded(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():  # and it is not the trained adapter: unlearning changed it
        trained = PeftModel.from_pretrained(build_model(cfg.model, tok, cfg.training.seed), str(out))
        trained.load_state_dict({k: v for k, v in s.replayer.state_at(s.tau)[0].items()}, strict=False)
        assert not torch.allclose(trained(input_ids=ids).logits, a)


def test_export_choice_is_checked():
    with pytest.raises(ConfigError, match="unlearn.export"):
        load_config(overrides=["unlearn.export=lora"])
