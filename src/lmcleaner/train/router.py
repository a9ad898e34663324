"""Router auxiliary losses for mixture-of-experts models."""

from __future__ import annotations

import torch


def _as_list(router_logits) -> list[torch.Tensor]:
    if isinstance(router_logits, torch.Tensor):
        return [router_logits]
    return [r for r in router_logits if r is not None]


def compute_router_auxiliary_loss(router_losses, load_balance_coef: float = 0.01, auxiliary_coef: float = 0.0,
                                  z_loss_coef: float = 0.0, top_k: int = 1) -> dict[str, torch.Tensor]:
    """Load-balance, balance-deviation and z-loss from router logits, averaged over layers.

    ``router_losses``: router logits per layer, each ``[tokens, C]`` (or
    ``[batch, seq, C]``). With ``f_i`` the fraction of top-k assignments to
    expert ``i`` and ``P_i`` its mean router probability:
    load balance ``C * sum_i f_i P_i`` (Switch Transformer), auxiliary
    ``sum_i (f_i - 1/C)^2``, z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE).
    ``total`` is the coefficient-weighted sum.
    """
    layers = _as_list(router_losses)
    if not layers:
        zero = torch.zeros(())
        return {"load_balance": zero, "auxiliary": zero, "z_loss": zero, "total": zero}
    lb, aux, z = [], [], []
    for logits in layers:
        logits = logits.float().reshape(-1, logits.shape[-1])
        n_exp = logits.shape[-1]
        probs = logits.softmax(-1)
        chosen = probs.topk(top_k, dim=-1).indices
        f = torch.zeros(n_exp, device=logits.device).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=logits.device)) / chosen.numel()
        p_mean = probs.mean(0)
        lb.append(n_exp * (f * p_mean).sum())
        aux.append(((f - 1.0 / n_exp) ** 2).sum())
        z.append((torch.logsumexp(logits, -1) ** 2).mean())
    out = {"load_balance": torch.stack(lb).mean(), "auxiliary": torch.stack(aux).mean(), "z_loss": torch.stack(z).mean()}
    out["total"] = load_balance_coef * out["load_balance"] + auxiliary_coef * out["auxiliary"] + z_loss_coef * out["z_loss"]
    return out
