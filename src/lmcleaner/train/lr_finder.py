"""Learning-rate range test (Smith 2015 / fastai style).

The learning rate of every param group grows exponentially from ``start_lr``
to ``end_lr`` (the groups keep their configured ratios); the loss is smoothed
with a bias-corrected EMA; the sweep stops when the smoothed loss exceeds
``diverge_factor`` x its minimum. Model and optimizer state are restored
afterwards, so the finder can run right before training. The suggestion is
the LR at the steepest descent of the smoothed loss.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch

from ..telemetry.progress import progress_bar
from .engine import run_step
from .hooks import NullRecorder
from .trainer import Trainer


def find_lr(config, start_lr: float = 1e-6, end_lr: float = 1.0, num_steps: int = 100, smooth: float = 0.98,
            diverge_factor: float = 4.0, plot_path: str | None = "lr_find.png", trainer: Trainer | None = None) -> dict:
    if not (0 < start_lr < end_lr):
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    trainer = trainer or Trainer(config, recorder=NullRecorder())
    eng = trainer.engine
    params = eng.trainable()
    saved_params = {n: p.detach().clone() for n, p in params.items()}
    saved_opt = copy.deepcopy(eng.optimizer.state_dict())
    saved_sched = eng.scheduler.state_dict()
    # initial_lr: the configured LR (the scheduler may have set lr=0 for warmup)
    base = [g.get("initial_lr", g["lr"]) for g in eng.optimizer.param_groups]
    ratios = [b / max(base) for b in base]
    gamma = (end_lr / start_lr) ** (1.0 / max(num_steps - 1, 1))
    lrs, losses, smoothed = [], [], []
    avg, best = 0.0, math.inf
    stopped = "end_lr reached"

    class _FixedLR:  # the sweep sets LRs itself; the real scheduler must not move them
        def step(self):
            pass

    real_sched, eng.scheduler = eng.scheduler, _FixedLR()
    try:
        for i in progress_bar(range(num_steps), desc="lr-find", enabled=config.training.progress_bar):
            lr = start_lr * gamma**i
            for g, r in zip(eng.optimizer.param_groups, ratios):
                g["lr"] = lr * r
            s = i % trainer.plan.steps_per_epoch
            rec = run_step(eng, s, 0, trainer.plan.micro_batches(s))
            if not math.isfinite(rec.loss):
                stopped = "loss not finite"
                break
            avg = smooth * avg + (1 - smooth) * rec.loss
            sm = avg / (1 - smooth ** (i + 1))
            lrs.append(lr)
            losses.append(rec.loss)
            smoothed.append(sm)
            best = min(best, sm)
            if i > 5 and sm > diverge_factor * best:
                stopped = "diverged"
                break
    finally:
        eng.scheduler = real_sched
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved_params[n])
        eng.optimizer.load_state_dict(saved_opt)
        eng.scheduler.load_state_dict(saved_sched)
    suggestion = _steepest(lrs, smoothed)
    result = {"suggested_lr": suggestion, "min_loss_lr": lrs[int(np.argmin(smoothed))] if smoothed else None,
              "stopped": stopped, "num_points": len(lrs), "lrs": lrs, "losses": losses, "smoothed": smoothed}
    if plot_path and lrs:
        result["plot"] = str(_plot(lrs, smoothed, suggestion, plot_path))
    return result


def _steepest(lrs: list[float], smoothed: list[float]) -> float | None:
    if len(lrs) < 3:
        return lrs[0] if lrs else None
    grads = np.gradient(np.asarray(smoothed), np.log(np.asarray(lrs)))
    return float(lrs[int(np.argmin(grads))])


def _plot(lrs, smoothed, suggestion, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, smoothed, label="smoothed loss")
    if suggestion:
        ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested {suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (max group)")
    ax.set_ylabel("training loss (EMA)")
    ax.set_title("LR range test")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
