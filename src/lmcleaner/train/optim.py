"""Optimizer with per-group learning rates, and LR schedulers."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from ..trajectory.types import OptimizerSpec, ParamGroupSpec

_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def param_groups(named_params: dict[str, torch.nn.Parameter], t) -> list[dict]:
    """Split by name: ``memory`` -> memory_lr, ``lora_`` -> lora_lr, rest -> base_model_lr;
    names listed in ``weight_decay_exclude`` go to a ``<group>_no_decay`` twin with
    weight decay 0 (Hugging Face ``Trainer``'s rule for biases and norms).

    Empty groups are dropped; the group order is fixed so checkpoints and the
    recorded per-group learning rates line up across runs.
    """
    base = t.base_model_lr if t.base_model_lr is not None else t.learning_rate
    rules = [
        ("memory", "memory", t.memory_lr if t.memory_lr is not None else base),
        ("lora", "lora_", t.lora_lr if t.lora_lr is not None else t.learning_rate),
    ]
    no_decay = set(getattr(t, "weight_decay_exclude", None) or ())
    groups: dict[str, dict] = {}
    for name, p in named_params.items():
        gname, lr = "base", base
        for key, pattern, rule_lr in rules:
            if pattern in name:
                gname, lr = key, rule_lr
                break
        wd = t.weight_decay
        if name in no_decay:
            gname, wd = gname + "_no_decay", 0.0
        g = groups.setdefault(gname, {"name": gname, "lr": lr, "params": [], "param_names": [], "weight_decay": wd})
        g["params"].append(p)
        g["param_names"].append(name)
    order = [k + suffix for k in ("memory", "lora", "base") for suffix in ("", "_no_decay")]
    return [groups[k] for k in order if k in groups]


def build_optimizer(named_params: dict[str, torch.nn.Parameter], t) -> torch.optim.Optimizer:
    groups = param_groups(named_params, t)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                 eps=t.adam_epsilon, weight_decay=t.weight_decay, foreach=False)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate, momentum=t.momentum,
                               weight_decay=t.weight_decay, foreach=False)
    raise ValueError(f"unknown optimizer '{t.optimizer}': choose adamw or sgd")


def build_scheduler(optimizer, t, total_steps: int):
    if t.scheduler not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler '{t.scheduler}': choose one of {list(_SCHEDULERS)}")
    return get_scheduler(_SCHEDULERS[t.scheduler], optimizer, num_warmup_steps=t.warmup_steps,
                         num_training_steps=max(total_steps, 1))


def optimizer_spec(optimizer: torch.optim.Optimizer, t) -> OptimizerSpec:
    groups = [ParamGroupSpec(names=list(g["param_names"]), weight_decay=float(g["weight_decay"]),
                             base_lr=float(g.get("initial_lr", g["lr"]))) for g in optimizer.param_groups]
    d = optimizer.defaults
    return OptimizerSpec(
        name=t.optimizer, groups=groups,
        betas=tuple(d.get("betas", (0.9, 0.999))), eps=float(d.get("eps", 1e-8)),
        momentum=float(d.get("momentum", 0.0)), dampening=float(d.get("dampening", 0.0)),
        nesterov=bool(d.get("nesterov", False)),
        max_grad_norm=t.max_grad_norm if t.max_grad_norm and t.max_grad_norm > 0 else None,
    )
