"""Experts: 3-D SwiGLU weights and the grouped computation sort -> one GEMM per expert group -> combine.

Shape legend: T tokens, D hidden size, I expert intermediate size, E experts, K experts per token,
N routed assignments (T*K minus dropped ones).

The weight layout is transformers' Mixtral layout, so conversion is a rename:
    gate_up_proj (E, 2I, D): rows [0, I) are the gate projection, rows [I, 2I) the up projection.
    down_proj    (E, D, I).
A dropped assignment carries the sentinel index E: it is sorted past the last expert and never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def grouped_experts_forward(
    x_TD: torch.Tensor,
    gate_up_proj_EHD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    act_fn,
) -> torch.Tensor:
    """Run each token through its experts and sum the weighted outputs.

    Tokens are sorted by expert so that each expert's tokens are one contiguous slice, and each expert does
    one GEMM for its whole group (no per-token loop, no full (E, T, D) tensor).

    Args:
        x_TD: expert input, shape (T, D).
        gate_up_proj_EHD: fused gate and up weights, shape (E, 2I, D).
        down_proj_EDI: down weights, shape (E, D, I).
        indices_TK: expert per assignment, shape (T, K); the value E marks a dropped assignment.
        weights_TK: routing weight per assignment, shape (T, K) (float32 from the router).
        act_fn: the gate activation (SiLU for SwiGLU).
    Returns:
        y_TD: sum over k of weights_TK[t, k] * expert_{indices_TK[t, k]}(x_TD[t]), shape (T, D), dtype of x_TD.
        A token whose assignments are all dropped gets zeros, so it passes through the residual unchanged.
    """
    K = indices_TK.shape[1]
    E = gate_up_proj_EHD.shape[0]
    I = down_proj_EDI.shape[-1]

    flat_expert_N = indices_TK.reshape(-1)  # (T*K,)
    order_N = torch.argsort(flat_expert_N, stable=True)  # assignments grouped by expert, token order inside
    counts_E = torch.bincount(flat_expert_N, minlength=E + 1)[:E]  # the sentinel E is counted, then cut
    counts = counts_E.tolist()
    n_routed = sum(counts)
    order_N = order_N[:n_routed]  # dropped assignments sorted last: cut them
    token_N = order_N // K  # which token each sorted assignment belongs to
    x_ND = x_TD.index_select(0, token_N)
    weight_N1 = weights_TK.reshape(-1).index_select(0, order_N).unsqueeze(-1)

    y_ND = x_TD.new_empty(n_routed, x_TD.shape[-1])
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        gate_up = F.linear(x_ND[start:end], gate_up_proj_EHD[e])  # (n_e, 2I)
        h = act_fn(gate_up[:, :I]) * gate_up[:, I:]  # SwiGLU (Shazeer 2020, Eq. 6)
        y_ND[start:end] = F.linear(h, down_proj_EDI[e])  # (n_e, D)
        start = end

    y_ND = (y_ND * weight_N1).to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)


class MoeExperts(nn.Module):
    """E SwiGLU experts stored as two 3-D parameters (Mixtral layout); see the module docstring."""

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """(T, D) tokens, (T, K) expert indices (E = dropped), (T, K) weights -> (T, D) combined expert output."""
        return grouped_experts_forward(x_TD, self.gate_up_proj, self.down_proj, indices_TK, weights_TK, self.act_fn)


__all__ = ["MoeExperts", "grouped_experts_forward"]
