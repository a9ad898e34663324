"""Past steps from heavy storage: ``theta_s`` from recorded update vectors, no replay.

Heavy mode stores ``u_t = theta_{t+1} - theta_t`` per step, so ``theta_s`` is
the restore point before ``s`` plus a sum of updates: vector additions, no
model evaluation and no dataset pass. What the unlearning sweep still needs:

- the step's batches: stored tensors (``save_batch_data``) or rebuilt from
  the dataset and the recorded ids (``BatchReconstructor``), free either way;
- the step gradient ``g_s`` -- only where the linearisation uses it
  (clipping, AdamW); ``propagate`` computes it lazily and counts it;
- the optimizer state (AdamW ``m, v``; SGD momentum) -- heavy mode does not
  store it, so it is rebuilt by running the optimizer's own recursion on the
  gradients at the recorded ``theta_t`` from the restore point on
  (``m <- b1 m + (1-b1) g_c``, ``v <- b2 v + (1-b2) g_c^2``, ``b <- mu b + g``),
  one gradient per step.

So heavy storage saves the recovery replay entirely for plain SGD without
clipping (cost = curvature products only), and for AdamW or momentum it
replaces each replayed optimizer step by one gradient evaluation (the same
count; no optimizer step, no sequential dependence on the previous step's
result). ``HeavySteps`` yields ``ReplayedStep`` like
``TrajectoryReplayer.iter_steps``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from . import layout
from .types import OptimizerSpec, ReplayedStep
from .updates import apply_update

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_


class HeavySteps:
    """``ReplayedStep`` for ``start..end-1`` from a heavy-mode log (see module docstring)."""

    def __init__(self, log, reconstructor, spec: OptimizerSpec, grad_fn=None) -> None:
        if not log.has_updates:
            raise ValueError(f"{log.log_dir}: no update vectors (storage={log.storage}); record with "
                             "training_logger.storage=heavy")
        self.log, self.rec, self.spec = log, reconstructor, spec
        self.grad_fn = grad_fn  # (params, batches, normaliser) -> unclipped step gradient
        self.grad_evals = 0

    @property
    def needs_state(self) -> bool:
        name = self.spec.name.lower()
        return name == "adamw" or (name == "sgd" and self.spec.momentum != 0)

    def _batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        return self.log.batches(step) if self.log.has_batches else self.rec.batches(step)

    def _grad(self, params, batches, normaliser) -> dict[str, torch.Tensor]:
        if self.grad_fn is None:
            raise ValueError("heavy-mode optimizer state needs a gradient function (grad_fn)")
        self.grad_evals += 1
        return self.grad_fn(params, batches, normaliser)

    def _advance_state(self, state: dict[str, dict[str, Any]], g: dict[str, torch.Tensor],
                       theta: dict[str, torch.Tensor]) -> None:
        """The optimizer's own state recursion for one step, on the (clipped) gradient."""
        c = self.spec.max_grad_norm
        if c is not None and c > 0:
            n = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g.values()))
            coef = min(1.0, c / (n + _CLIP_EPS))
            g = {k: v * coef for k, v in g.items()}
        b1, b2 = self.spec.betas
        for name, gn in g.items():
            st = state.setdefault(name, {})
            if self.spec.name.lower() == "adamw":
                m = st.get("exp_avg", torch.zeros_like(gn))
                v = st.get("exp_avg_sq", torch.zeros_like(gn))
                st["exp_avg"] = b1 * m + (1 - b1) * gn
                st["exp_avg_sq"] = b2 * v + (1 - b2) * gn * gn
                st["step"] = torch.tensor(float(st.get("step", torch.tensor(0.0))) + 1)
            else:
                wd = next(gr.weight_decay for gr in self.spec.groups if name in gr.names)
                d_p = gn  # coupled weight decay enters the momentum buffer with the gradient
                if wd:
                    d_p = gn + wd * theta[name].float()
                buf = st.get("momentum_buffer")
                st["momentum_buffer"] = d_p.clone() if buf is None else (
                    self.spec.momentum * buf + (1 - self.spec.dampening) * d_p)

    def __call__(self, start: int, end: int) -> Iterator[ReplayedStep]:
        from ..train.checkpoint import load_optimizer_tensors, read_json, verify_checkpoint

        point = self.log.restore_point_for(start)
        theta = self.log.params_at(point.step)  # checks the checkpoint's hashes (as the log recorded them)
        state: dict[str, dict[str, Any]] | None = None
        if self.needs_state:
            verify_checkpoint(point.path, point.files)  # already hashed by params_at: a cache lookup
            flat = load_optimizer_tensors(point.path)
            state = {}
            for key, v in flat.items():
                name, k = key.split("::", 1)
                if name in theta:
                    state.setdefault(name, {})[k] = v.float().clone()
            scalars = (read_json(point.path / "optimizer.json") or {}).get("scalars", {})
            for name, d in scalars.items():  # a non-tensor "step" is stored as a scalar
                if name in state and "step" in d and "step" not in state[name]:
                    state[name]["step"] = torch.tensor(float(d["step"]))
        for t in range(point.step, end):
            rec = self.log.record(t)
            if t >= start:
                batches = self._batches(t)
                grad = None
                if self.needs_state:
                    grad = self._grad(theta, batches, rec.normaliser)
                yield ReplayedStep(record=rec, params=theta,
                                   batches=batches, grad=grad,
                                   opt_state={n: dict(s) for n, s in state.items()} if state is not None else None)
            elif self.needs_state:
                grad = self._grad(theta, self._batches(t), rec.normaliser)
            if self.needs_state:
                self._advance_state(state, grad, theta)
            theta = self._next(theta, t)

    def _next(self, theta: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
        """``theta_{t+1}`` from ``theta_t`` and the recorded update (bit-exact, as ``params_at``)."""
        u = self.log.update(t)
        pi = self.log._tensors(layout.PATCH_INDEX, t)
        pv = self.log._tensors(layout.PATCH_VALUE, t)
        return {n: apply_update(v, u[n], pi.get(n), pv.get(n)) for n, v in theta.items()}
