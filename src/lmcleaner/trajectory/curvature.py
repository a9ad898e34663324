"""Per-step diagonal curvature estimates for ``storage=diag``.

Why record it during training: ``hessian_mode=diag`` then propagates with an
elementwise product and needs no second derivatives (and no replay of them)
at unlearning time. Two estimators, named for what they are:

- ``hutchinson`` (default): ``diag(H) ~ mean_k z_k * (H z_k)`` with Rademacher
  ``z_k`` (``diag_probes`` probes), ``H`` the Hessian of the *step loss*
  (token-mean NLL over all micro-batches, normaliser of the step) at the
  recorded ``theta_t``, one Hessian-vector product per probe by double
  backward (for a mixture of experts with router losses, the step loss
  includes its router term, ``train.router``). Unbiased for the true Hessian
  diagonal; one probe is noisy.
  Costs about 2-4 gradient evaluations per probe, on the training thread.
- ``empirical_fisher``: ``g_t * g_t`` with ``g_t`` the step's unclipped
  gradient (already computed by the step, so almost free). This is the
  squared *mini-batch* gradient, a crude empirical-Fisher diagonal: it is
  positive, ignores curvature that the gradient does not see and is smaller
  than the per-sample empirical Fisher by about the batch size. Use it only
  when the Hutchinson cost is not affordable.

The probes are drawn from a generator seeded with the step's seed, so the
estimate is reproducible; the dropout masks are those of the step.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from ..train.loss import token_nll_sum
from ..train.router import RouterAux, has_samples


def hutchinson_diag(model: torch.nn.Module, params: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
                    normaliser: int, seed: int, probes: int = 1, device: torch.device | str = "cpu",
                    loss_scale: float = 1.0, router: RouterAux | None = None,
                    n_micro: int = 0) -> dict[str, torch.Tensor]:
    """Hutchinson estimate of the step-loss Hessian diagonal at ``params`` (float32).

    ``params``: trainable parameters ``theta_t`` by name (others are the
    module's own); ``batches``: the step's collated (kept) micro-batches;
    ``router``/``n_micro``: the run's router term and the step's number of
    non-empty micro-batches ``M+`` (all ranks).
    """
    names = list(params)
    leaves = {n: params[n].detach().to(device).float().requires_grad_(True) for n in names}
    if normaliser <= 0:
        return {n: torch.zeros_like(leaves[n]) for n in names}
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            call_params = {n: leaves[n].to(params[n].dtype) for n in names}
            loss = torch.zeros((), device=device)
            for b in batches:
                kwargs = {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device),
                          "use_cache": False}
                if router is not None:
                    kwargs["output_router_logits"] = True
                out = functional_call(model, call_params, args=(), kwargs=kwargs)
                loss = loss + token_nll_sum(out.logits, b["labels"].to(device))
                if router is not None and n_micro > 0 and has_samples(b):
                    loss = loss + (normaliser / n_micro) * router.loss(out.router_logits, b)
            loss = loss * (loss_scale / normaliser)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True, allow_unused=True)
            gen = torch.Generator().manual_seed(int(seed) % (2**63 - 1))
            acc = {n: torch.zeros_like(leaves[n]) for n in names}
            pairs = [(n, g) for n, g in zip(names, grads) if g is not None and g.requires_grad]
            for k in range(probes):
                zs = {n: (torch.randint(0, 2, leaves[n].shape, generator=gen) * 2 - 1).to(leaves[n]) for n, _ in pairs}
                hz = torch.autograd.grad([g for _, g in pairs], [leaves[n] for n, _ in pairs],
                                         grad_outputs=[zs[n] for n, _ in pairs], retain_graph=k < probes - 1,
                                         allow_unused=True)
                for (n, _), h in zip(pairs, hz):
                    if h is not None:
                        acc[n] += zs[n] * h
    finally:
        model.train(was_training)
    return {n: (v / probes).detach() for n, v in acc.items()}


def empirical_fisher_diag(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``g * g`` of the step's unclipped gradient (see the module docstring for what it is not)."""
    return {n: g.float() * g.float() for n, g in grads.items()}
