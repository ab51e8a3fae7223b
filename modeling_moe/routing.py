"""Routers: router logits -> (weights, expert indices), and the capacity rule that drops overflow.

Shape legend used in every name and comment of this file:
    T tokens (batch * sequence, flattened), D hidden size, E experts, K experts per token.

All functions are pure tensor functions; `MoeRouter` is the only module and owns the router weight.
Softmax is taken in float32 whatever the activation dtype, as in transformers' Mixtral.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def topk_softmax_routing(
    logits_TE: torch.Tensor, k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over all E experts, keep the k largest, optionally renormalise them to sum to 1.

    Args:
        logits_TE: router logits, shape (T, E), any float dtype.
        k: experts per token, 1 <= k <= E.
        renormalize: divide the kept probabilities by their sum (Mixtral, Eq. in Sec. 2.1 of Jiang et al. 2024).
    Returns:
        weights_TK: float32 routing weights, shape (T, K).
        indices_TK: int64 expert indices, shape (T, K), in decreasing order of probability.
    """
    probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
    weights_TK, indices_TK = torch.topk(probs_TE, k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, indices_TK


def switch_routing(logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformer routing: each token goes to its argmax expert, scaled by that expert's probability.

    The output of expert i for token x is multiplied by p_i(x) = softmax(W_r x)_i (Fedus et al. 2021, Eq. 1-2),
    which is how the router receives a gradient even though only one expert runs.

    Args:
        logits_TE: router logits, shape (T, E).
    Returns:
        weights_TK: float32 router probability of the chosen expert, shape (T, 1).
        indices_TK: int64 chosen expert, shape (T, 1).
    """
    return topk_softmax_routing(logits_TE, 1, renormalize=False)


def expert_capacity(num_tokens: int, k: int, capacity_factor: float, num_experts: int) -> int:
    """Slots per expert in one forward pass: ceil(tokens * k * capacity_factor / E) (Switch, Eq. 3; GShard).

    Args:
        num_tokens: T, tokens sharing the forward pass (every row of the batch, padding included).
        k: experts per token. capacity_factor: > 0. num_experts: E.
    Returns:
        The capacity, an int >= 1 whenever num_tokens >= 1.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return math.ceil(num_tokens * k * capacity_factor / num_experts)


def capacity_keep_mask(indices_TK: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """Which assignments fit within each expert's capacity, filled in GShard's arrival order.

    Slots go by token position, and every token's first choice is placed before any token's second choice
    (Lepikhin et al. 2020, Algorithm 1). An assignment that finds its expert full is dropped.

    Args:
        indices_TK: expert index per assignment, shape (T, K).
        capacity: slots per expert (see `expert_capacity`).
        num_experts: E.
    Returns:
        keep_TK: bool, shape (T, K); False where the assignment overflowed.
    """
    T, K = indices_TK.shape
    choice_major_N = indices_TK.t().reshape(-1)  # (K*T,): all first choices, then all second choices
    one_hot_NE = F.one_hot(choice_major_N, num_experts).to(torch.int32)
    position_N = (one_hot_NE.cumsum(dim=0) * one_hot_NE).sum(dim=-1) - 1  # slot this assignment would take
    keep_N = position_N < capacity
    return keep_N.view(K, T).t()


class MoeRouter(nn.Module):
    """Linear router: hidden states -> raw logits -> (weights, indices) under `config.router_type`.

    The forward returns `(router_logits_TE, weights_TK, indices_TK)`, with the raw logits first so that
    transformers' output recorder can collect them (`output_router_logits=True`).
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.router_type = config.router_type
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))  # (E, D)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route T tokens.

        Args:
            x_TD: router input, shape (T, D).
        Returns:
            router_logits_TE (T, E) in the input dtype; weights_TK (T, K) float32; indices_TK (T, K) int64.
        """
        if self.training and self.jitter_noise > 0:
            # Multiplicative jitter on the router input only (Switch Transformer, Sec. 2.4 / Appendix A).
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            x_TD = x_TD * noise
        router_logits_TE = F.linear(x_TD, self.weight)
        if self.router_type == "switch":
            weights_TK, indices_TK = switch_routing(router_logits_TE)
        else:
            weights_TK, indices_TK = topk_softmax_routing(router_logits_TE, self.top_k)
        return router_logits_TE, weights_TK, indices_TK


__all__ = ["MoeRouter", "capacity_keep_mask", "expert_capacity", "switch_routing", "topk_softmax_routing"]
