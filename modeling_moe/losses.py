"""Router losses as pure functions of router logits and a token mask. No global state.

Shape legend: T tokens of one layer (batch * sequence, flattened), E experts, K experts per token,
B batch, S sequence length. `router_logits` is a sequence with one (T, E) tensor per MoE layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _token_weights(attention_mask_BS: torch.Tensor | None, num_rows: int, device) -> torch.Tensor | None:
    """Flatten a (B, S) 0/1 mask into a float (T,) weight per router row, or None when no mask is given."""
    if attention_mask_BS is None:
        return None
    mask_T = attention_mask_BS.reshape(-1).to(device=device, dtype=torch.float32)
    if mask_T.numel() != num_rows:
        raise ValueError(
            f"attention_mask has {mask_T.numel()} positions but the router saw {num_rows} tokens; pass the mask "
            "of the tokens in this forward pass, shape (batch, sequence)"
        )
    return mask_T


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch / GShard auxiliary load-balancing loss, pooled over all MoE layers (transformers' convention).

    loss = E * sum_i f_i * P_i (Fedus et al. 2021, Eq. 4), where f_i is the fraction of tokens whose top-k
    includes expert i (Eq. 5, so sum_i f_i = k) and P_i the mean router probability of expert i (Eq. 6).
    Uniform router probabilities give exactly k. Rows where `attention_mask` is 0 are left out of both means.

    Args:
        router_logits: one (T, E) tensor per MoE layer, all layers with the same T.
        num_experts: E. top_k: K.
        attention_mask: optional (B, S) mask with B * S = T; 1 = real token, 0 = padding.
    Returns:
        A float32 scalar tensor (0 when there are no MoE layers).
    """
    if len(router_logits) == 0:
        return torch.zeros(())
    device = router_logits[0].device
    mask_T = _token_weights(attention_mask, router_logits[0].shape[0], device)
    counts_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits_TE in router_logits:
        probs_TE = F.softmax(logits_TE.to(device), dim=-1, dtype=torch.float32)
        _, selected_TK = torch.topk(probs_TE, top_k, dim=-1)
        weight_T = mask_T if mask_T is not None else probs_TE.new_ones(probs_TE.shape[0])
        counts_E = counts_E.scatter_add(0, selected_TK.reshape(-1), weight_T.repeat_interleave(top_k))
        prob_sum_E = prob_sum_E + (probs_TE * weight_T[:, None]).sum(dim=0)
        rows = rows + weight_T.sum()
    rows = rows.clamp_min(1.0)
    f_E = counts_E / rows  # Eq. 5 (summed over the k choices)
    P_E = prob_sum_E / rows  # Eq. 6
    return num_experts * torch.sum(f_E * P_E)  # Eq. 4


def load_balancing_loss_per_layer(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Switch / GShard loss computed for each MoE layer alone, then averaged over layers.

    Pooling all layers (`load_balancing_loss`) lets one imbalanced layer hide behind balanced ones, because the
    pooled counts average out; per-layer losses penalise each layer's own imbalance.

    Returns:
        A float32 scalar tensor (0 when there are no MoE layers).
    """
    if len(router_logits) == 0:
        return torch.zeros(())
    losses = [load_balancing_loss([logits_TE], num_experts, top_k, attention_mask) for logits_TE in router_logits]
    return torch.stack(losses).mean()


def importance_loss(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Importance loss of Shazeer et al. 2017 (Eq. 6-7): CV(Importance)^2 per layer, averaged over layers.

    Importance_i = sum over tokens of the router probability of expert i (softmax of the logits, for every
    router type). CV = std / mean over experts, with the population standard deviation (divide by E, not E-1).
    The coefficient w_importance is applied by the caller.

    Returns:
        A float32 scalar tensor (0 when there are no MoE layers).
    """
    if len(router_logits) == 0:
        return torch.zeros(())
    device = router_logits[0].device
    mask_T = _token_weights(attention_mask, router_logits[0].shape[0], device)
    per_layer = []
    for logits_TE in router_logits:
        probs_TE = F.softmax(logits_TE.to(device), dim=-1, dtype=torch.float32)
        if mask_T is not None:
            probs_TE = probs_TE * mask_T[:, None]
        importance_E = probs_TE.sum(dim=0)  # Eq. 6
        cv = importance_E.std(correction=0) / importance_E.mean().clamp_min(1e-20)  # population std
        per_layer.append(cv**2)  # Eq. 7 without w_importance
    return torch.stack(per_layer).mean()


def router_z_loss(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (Zoph et al. 2022, Eq. 5), mean over layers.

    Args:
        router_logits: one (T, E) tensor per MoE layer.
        attention_mask: optional (B, S) mask with B * S = T; padding rows are left out.
    Returns:
        A float32 scalar tensor (0 when there are no MoE layers).
    """
    if len(router_logits) == 0:
        return torch.zeros(())
    device = router_logits[0].device
    mask_T = _token_weights(attention_mask, router_logits[0].shape[0], device)
    per_layer = []
    for logits_TE in router_logits:
        z_T = torch.logsumexp(logits_TE.to(device).float(), dim=-1) ** 2  # Eq. 5
        if mask_T is None:
            per_layer.append(z_T.mean())
        else:
            per_layer.append((z_T * mask_T).sum() / mask_T.sum().clamp_min(1.0))
    return torch.stack(per_layer).mean()


__all__ = ["importance_loss", "load_balancing_loss", "load_balancing_loss_per_layer", "router_z_loss"]
