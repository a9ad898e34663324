import math

import pytest
import torch

from lmcleaner.train import Trainer, compute_router_auxiliary_loss, list_checkpoints
from lmcleaner.train.optim import param_groups

from ..conftest import tiny_config


def test_loss_decreases_and_outputs_loadable(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path, "training.max_steps=30", "training.learning_rate=3e-3")
    state = Trainer(cfg).train()
    losses = [h["loss"] for h in state.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_model")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_lora_trains_only_adapters(tmp_path):
    cfg = tiny_config(tmp_path, "lora.enabled=true", "lora.r=4", "training.max_steps=4",
                      "lora.target_modules=[q_proj,v_proj]")
    trainer = Trainer(cfg)
    names = list(trainer.engine.trainable())
    assert names and all("lora_" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in trainer.engine.unwrapped.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainer.engine.trainable().items()}
    trainer.train()
    after = trainer.engine.trainable()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    now = dict(trainer.engine.unwrapped.named_parameters())
    assert all(torch.equal(frozen[n], now[n]) for n in frozen)
    from transformers import AutoModelForCausalLM  # exported model has LoRA merged

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_model")


def test_param_group_learning_rates(tmp_path):
    cfg = tiny_config(tmp_path, "lora.enabled=true", "training.lora_lr=0.01", "training.base_model_lr=0.001",
                      "training.memory_lr=0.1")
    params = {"base.lora_A.weight": torch.nn.Parameter(torch.zeros(1)), "mlp.weight": torch.nn.Parameter(torch.zeros(1)),
              "memory.bank": torch.nn.Parameter(torch.zeros(1))}
    groups = {g["name"]: g for g in param_groups(params, cfg.training)}
    assert groups["lora"]["lr"] == 0.01 and groups["lora"]["param_names"] == ["base.lora_A.weight"]
    assert groups["base"]["lr"] == 0.001 and groups["memory"]["lr"] == 0.1
    # applied per-group LRs keep their ratio under the schedule
    trainer = Trainer(tiny_config(tmp_path, "training.max_steps=3", "training.scheduler=linear"))
    assert len(trainer.engine.optimizer.param_groups) == 1


def test_router_aux_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    out = compute_router_auxiliary_loss([logits], load_balance_coef=0.5, auxiliary_coef=2.0, z_loss_coef=0.1)
    p = logits.softmax(-1)
    f = torch.tensor([2 / 3, 1 / 3])  # top-1 picks expert 0, 1, 0
    P = p.mean(0)
    lb = 2 * (f * P).sum()
    aux = ((f - 0.5) ** 2).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    assert torch.allclose(out["load_balance"], lb) and torch.allclose(out["auxiliary"], aux)
    assert torch.allclose(out["z_loss"], z)
    assert torch.allclose(out["total"], 0.5 * lb + 2.0 * aux + 0.1 * z)
    assert math.isclose(float(aux), (2 / 3 - 0.5) ** 2 + (1 / 3 - 0.5) ** 2, rel_tol=1e-6)


def test_router_loss_enters_training_of_moe_model(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    from lmcleaner.data import embedded_tokenizer

    tok = embedded_tokenizer()
    cfg_m = MixtralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=1)
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, "training.max_steps=2", "training.load_balance_coef=0.0")
    a = Trainer(cfg, model=MixtralForCausalLM(cfg_m), tokenizer=tok).train()
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path / "b", "training.max_steps=2", "training.load_balance_coef=5.0")
    trainer_b = Trainer(cfg, model=MixtralForCausalLM(cfg_m), tokenizer=tok)
    b = trainer_b.train()
    assert a.history[0]["loss"] == b.history[0]["loss"]  # reported LM loss excludes the auxiliary term
    assert a.history[0]["grad_norm"] != b.history[0]["grad_norm"]  # but its gradient is there


def test_eval_early_stopping_best_model_and_rotation(tmp_path):
    cfg = tiny_config(tmp_path, "training.max_steps=40", "training.validation_dataset=embedded",
                      "training.validation_split=holdout", "training.eval_steps=2", "training.save_steps=2",
                      "training.save_total_limit=2", "training.save_best_model=true", "training.early_stopping=true",
                      "training.early_stopping_patience=2", "training.early_stopping_threshold=10.0",
                      "training.learning_rate=3e-3")
    state = Trainer(cfg).train()
    assert state.stopped_early and state.step < 40  # a 10-nat threshold can never be met
    assert len(state.eval_history) == 3 and state.best_step == 2
    run = tmp_path / "run"
    assert (run / "best_model" / "model.safetensors").is_file()
    kept = list_checkpoints(run)
    assert state.best_step in kept and state.step in kept
    assert len([s for s in kept if s not in (state.best_step, state.step)]) <= 2


def test_bf16_autocast_runs(tmp_path):
    state = Trainer(tiny_config(tmp_path, "training.max_steps=2", "training.mixed_precision=bf16")).train()
    assert all(math.isfinite(h["loss"]) for h in state.history)


def test_gradient_checkpointing_same_losses(tmp_path):
    a = Trainer(tiny_config(tmp_path / "a", "training.max_steps=3")).train()
    b = Trainer(tiny_config(tmp_path / "b", "training.max_steps=3", "training.gradient_checkpointing=true")).train()
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-5)


def test_lr_finder_restores_state_and_plots(tmp_path):
    from lmcleaner.train.lr_finder import find_lr

    cfg = tiny_config(tmp_path, "training.max_steps=5")
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.engine.trainable().items()}
    lr_before = [g["lr"] for g in trainer.engine.optimizer.param_groups]
    res = find_lr(cfg, start_lr=1e-5, end_lr=10.0, num_steps=40, plot_path=str(tmp_path / "lr.png"), trainer=trainer)
    assert (tmp_path / "lr.png").stat().st_size > 1000
    assert 1e-5 <= res["suggested_lr"] <= 10.0
    assert res["stopped"] in ("diverged", "end_lr reached", "loss not finite")
    assert all(torch.equal(before[n], p) for n, p in trainer.engine.trainable().items())
    assert [g["lr"] for g in trainer.engine.optimizer.param_groups] == lr_before
    assert not trainer.engine.optimizer.state_dict()["state"]
