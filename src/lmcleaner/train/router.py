"""Router auxiliary losses of mixture-of-experts models, and their place in the step loss.

Per micro-batch. Let ``B`` be one micro-batch and ``T(B)`` its *real* tokens:
positions with ``attention_mask = 1`` in rows that hold a sample (the
all-padding row the collator makes for an emptied micro-batch has none).
For every MoE layer ``l`` with router logits ``r_{l,x}`` (``C`` experts) at
token ``x``, ``p_{l,x} = softmax(r_{l,x})`` and ``k`` the router's top-k
(``num_experts_per_tok``):

- ``f_{l,i}``: the fraction of the ``k |T(B)|`` top-k assignments that go to
  expert ``i`` (``sum_i f_{l,i} = 1``; a constant: top-k has no gradient);
- ``P_{l,i} = mean_x p_{l,x,i}``;
- load balance ``LB_l = C sum_i f_{l,i} P_{l,i}`` (Switch Transformer; for
  ``k > 1`` Hugging Face's Mixtral loss is ``k`` times this);
- balance deviation ``AUX_l = sum_i (f_{l,i} - 1/C)^2``;
- z-loss ``Z_l = mean_x logsumexp(r_{l,x})^2`` (ST-MoE).

``A(B) = lb * mean_l LB_l + aux * mean_l AUX_l + z * mean_l Z_l`` with the
coefficients ``training.{load_balance_coef, auxiliary_coef, z_loss_coef}``.

The step loss. With ``B_1..B_M`` the step's micro-batches (all
accumulation steps, all ranks), ``S_b`` the summed supervised-token NLL of
``B_b``, ``N`` the step's supervised tokens and ``M+`` the number of
micro-batches that hold at least one sample:

    L_t = (1/N) sum_b S_b + (1/M+) sum_{b: B_b non-empty} A(B_b)

i.e. the NLL is a token mean over the whole step (``train.loss``) and the
router term a *mean over micro-batches* (each forward pass balances its own
tokens, as Hugging Face computes it); neither is a per-sample sum. One process
with accumulation ``a`` and ``a`` ranks with one micro-batch each compute the
same ``L_t``.

The counterfactual without a forget set ``Z`` (DESIGN §3) removes ``Z``'s
rows from every micro-batch and recomputes everything that depends on them:
``N' `` (supervised tokens left), each ``A(B_b \\ Z)`` over the tokens left in
``B_b``, and ``M+'`` (micro-batches left non-empty):

    L_t^{-Z} = (1/N') sum_b S(B_b \\ Z) + (1/M+') sum_{b: B_b \\ Z non-empty} A(B_b \\ Z)

This is what exact replay trains on (``engine.run_step`` with the ids
excluded), so replay equals retraining, and what LMCleaner's injection
``grad L^{-Z} - grad L`` and its curvature (``unlearn.functional``,
``unlearn.hvp``) differentiate. A token's router logits depend on its own row
only (no capacity limit), so ``A(B)`` is a function of the multiset of its
tokens' logits and can be formed from row subsets evaluated separately.

For the unlearning code it is convenient to write the step loss as
``L_t = (1/N~) sum_b l_b`` with ``N~ = max(N, 1)`` and the micro-batch
objective ``l_b = S_b + (N~ / M+) A(B_b)``: curvature and gradients are then
sums over micro-batches of one scalar each, divided once (and with no router
``l_b = S_b``, exactly the dense-model arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _as_list(router_logits) -> list[torch.Tensor]:
    if isinstance(router_logits, torch.Tensor):
        return [router_logits]
    return [r for r in router_logits if r is not None]


def compute_router_auxiliary_loss(router_losses, load_balance_coef: float = 0.01, auxiliary_coef: float = 0.0,
                                  z_loss_coef: float = 0.0, top_k: int = 1,
                                  token_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Load-balance, balance-deviation and z-loss from router logits, averaged over layers.

    ``router_losses``: router logits per layer, each ``[tokens, C]`` (or
    ``[batch, seq, C]``); ``top_k``: experts per token (the model's
    ``num_experts_per_tok``); ``token_mask``: ``[tokens]`` (or ``[batch,
    seq]``), the tokens that count (all when ``None``). See the module
    docstring for the definitions. ``total`` is the coefficient-weighted sum;
    with no counted token every term is 0.
    """
    layers = _as_list(router_losses)
    if not layers:
        zero = torch.zeros(())
        return {"load_balance": zero, "auxiliary": zero, "z_loss": zero, "total": zero}
    lb, aux, z = [], [], []
    for logits in layers:
        logits = logits.float().reshape(-1, logits.shape[-1])
        n_exp = logits.shape[-1]
        k = min(int(top_k), n_exp)
        w = (torch.ones(logits.shape[0], device=logits.device) if token_mask is None
             else token_mask.reshape(-1).to(device=logits.device, dtype=torch.float32))
        count = w.sum().clamp_min(1.0)
        probs = logits.softmax(-1)
        chosen = probs.topk(k, dim=-1).indices
        f = torch.zeros(n_exp, device=logits.device).scatter_add_(
            0, chosen.reshape(-1), w.repeat_interleave(k)) / (count * k)
        p_mean = (probs * w.unsqueeze(-1)).sum(0) / count
        lb.append(n_exp * (f * p_mean).sum())
        dev = ((f - 1.0 / n_exp) ** 2).sum()
        aux.append(dev if token_mask is None or w.sum() > 0 else dev * 0.0)
        z.append(((torch.logsumexp(logits, -1) ** 2) * w).sum() / count)
    out = {"load_balance": torch.stack(lb).mean(), "auxiliary": torch.stack(aux).mean(), "z_loss": torch.stack(z).mean()}
    out["total"] = load_balance_coef * out["load_balance"] + auxiliary_coef * out["auxiliary"] + z_loss_coef * out["z_loss"]
    return out


def real_token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[rows, seq]`` bool: the tokens of rows that hold a sample (see the module docstring)."""
    mask = batch["attention_mask"].bool()
    ids = batch.get("sample_ids")
    if ids is not None:
        mask = mask & (ids.to(mask.device) >= 0).unsqueeze(-1)
    return mask


def has_samples(batch: dict[str, torch.Tensor]) -> bool:
    ids = batch.get("sample_ids")
    return bool((ids >= 0).any()) if ids is not None else batch["input_ids"].shape[0] > 0


def count_nonempty(batches: list[dict[str, torch.Tensor]]) -> int:
    """``M+``: micro-batches holding at least one sample."""
    return sum(1 for b in batches if has_samples(b))


def _experts(config) -> int:
    return int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0)


def _top_k(config) -> int:
    for key in ("num_experts_per_tok", "moe_topk", "top_k"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1


@dataclass(frozen=True)
class RouterAux:
    """The router term of a run's step loss (module docstring): ``A(B)`` and its weights."""

    num_experts: int
    top_k: int
    load_balance_coef: float
    auxiliary_coef: float
    z_loss_coef: float

    @classmethod
    def for_model(cls, model: torch.nn.Module, training) -> RouterAux | None:
        """``None`` unless ``model`` is a mixture of experts and ``training.router_aux_loss`` is on.

        ``top_k`` is the model config's ``num_experts_per_tok``; ``training``
        is the ``TrainingConfig`` (or anything with its router fields).
        """
        config = getattr(model, "config", None)
        if config is None or not getattr(training, "router_aux_loss", False) or _experts(config) <= 0:
            return None
        return cls(_experts(config), _top_k(config), float(training.load_balance_coef),
                   float(training.auxiliary_coef), float(training.z_loss_coef))

    def loss(self, router_logits, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``A(B)`` over the real tokens of ``batch`` (0 when it holds no sample)."""
        mask = real_token_mask(batch)
        return compute_router_auxiliary_loss(router_logits, self.load_balance_coef, self.auxiliary_coef,
                                             self.z_loss_coef, self.top_k, mask)["total"]

    def loss_of_parts(self, parts: list[tuple[tuple, torch.Tensor]]) -> torch.Tensor:
        """``A`` of the union of row subsets of one micro-batch evaluated separately.

        ``parts``: ``(router_logits per layer, token_mask)`` per subset; the
        layers' logits and masks are concatenated over tokens (the loss is a
        function of the multiset of token logits).
        """
        layers = [torch.cat([p[0][l].reshape(-1, p[0][l].shape[-1]) for p in parts])
                  for l in range(len(_as_list(parts[0][0])))]
        mask = torch.cat([p[1].reshape(-1) for p in parts])
        return compute_router_auxiliary_loss(layers, self.load_balance_coef, self.auxiliary_coef,
                                             self.z_loss_coef, self.top_k, mask)["total"]
