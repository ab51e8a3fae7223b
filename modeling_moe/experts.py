"""Experts: 3-D SwiGLU weights and the grouped computation sort -> one GEMM per expert group -> combine.

Shape legend: T tokens, D hidden size, I expert intermediate size, E experts, K experts per token,
N routed assignments (T*K minus dropped ones).

The weight layout is transformers' Mixtral layout, so conversion is a rename:
    gate_up_proj (E, 2I, D): rows [0, I) are the gate projection, rows [I, 2I) the up projection.
    down_proj    (E, D, I).
    gate_up_proj_bias (E, 2I), down_proj_bias (E, D): only with `config.mlp_bias` (transformers' names).
A dropped assignment carries the sentinel index E: it is sorted past the last expert and never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN, SiLUActivation
from transformers.integrations import use_experts_implementation


def _swiglu_group_forward(x_nD, w1_HD, w2_DI, b1_H, b2_D, y_out_nD) -> torch.Tensor:
    """One expert on its n tokens: gu = x W1^T + b1 (n, 2I), y = SwiGLU(gu) W2^T + b2 written into `y_out_nD`.
    Biases may be None. Returns gu (kept for the backward)."""
    I = w2_DI.shape[-1]
    gu_nH = torch.mm(x_nD, w1_HD.t()) if b1_H is None else torch.addmm(b1_H, x_nD, w1_HD.t())
    h_nI = F.silu(gu_nH[:, :I]) * gu_nH[:, I:]  # SwiGLU (Shazeer 2020, Eq. 6)
    if b2_D is None:
        torch.mm(h_nI, w2_DI.t(), out=y_out_nD)
    else:
        torch.addmm(b2_D, h_nI, w2_DI.t(), out=y_out_nD)
    return gu_nH


class GroupedSwiGLU(torch.autograd.Function):
    """SwiGLU experts on expert-sorted tokens, with a hand-written backward.

        Autograd through per-expert slices `W[e]` would allocate a full (E, 2I, D) zero gradient for every expert
        it touches (E times the weight size in memory traffic); this backward writes each expert's gradient slice
        once. Forward saves each expert's (n_e, 2I) gate/up activations, as autograd would; SiLU and the product are
    recomputed. They are separate per-expert tensors, not one (N, 2I) buffer: on the CPU a buffer above glibc's mmap
    threshold (32 MiB at most) is returned to the OS on every free and page-faults on every call.

        Inputs: x_ND (N, D) sorted by expert; gate_up_EHD (E, 2I, D); down_EDI (E, D, I); optional biases
        gate_up_bias_EH (E, 2I) and down_bias_ED (E, D) (or None); counts: tokens per expert (python ints, sum N).
        Output: y_ND (N, D), the unweighted expert outputs in the same order.
    """

    @staticmethod
    def forward(ctx, x_ND, gate_up_EHD, down_EDI, gate_up_bias_EH, down_bias_ED, counts):
        N, D = x_ND.shape
        y_ND = x_ND.new_empty(N, D)
        gu_per_expert = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                end = start + n
                b1 = gate_up_bias_EH[e] if gate_up_bias_EH is not None else None
                b2 = down_bias_ED[e] if down_bias_ED is not None else None
                gu_per_expert.append(
                    _swiglu_group_forward(x_ND[start:end], gate_up_EHD[e], down_EDI[e], b1, b2, y_ND[start:end])
                )
                start = end
        ctx.save_for_backward(x_ND, gate_up_EHD, down_EDI, *gu_per_expert)
        ctx.counts = counts
        ctx.has_bias = (gate_up_bias_EH is not None, down_bias_ED is not None)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, gate_up_EHD, down_EDI, *gu_per_expert = ctx.saved_tensors
        gu_iter = iter(gu_per_expert)
        I = down_EDI.shape[-1]
        need_x, need_w1, need_w2, need_b1, need_b2 = ctx.needs_input_grad[:5]
        dx_ND = torch.empty_like(x_ND) if need_x else None
        dw1 = torch.empty_like(gate_up_EHD) if need_w1 else None
        dw2 = torch.empty_like(down_EDI) if need_w2 else None
        db1 = gate_up_EHD.new_zeros(gate_up_EHD.shape[:2]) if need_b1 else None  # (E, 2I)
        db2 = down_EDI.new_zeros(down_EDI.shape[:2]) if need_b2 else None  # (E, D)
        dy_ND = dy_ND.contiguous()
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                if need_w1:
                    dw1[e].zero_()
                if need_w2:
                    dw2[e].zero_()
                continue
            end = start + n
            gu = next(gu_iter)  # (n, 2I)
            gate, up = gu[:, :I], gu[:, I:]
            sig = torch.sigmoid(gate)
            act = gate * sig  # silu(gate)
            dy = dy_ND[start:end]
            if need_w2:
                torch.mm(dy.t(), act * up, out=dw2[e])  # dL/dW2 = dy^T h
            if need_b2:
                torch.sum(dy, dim=0, out=db2[e])
            dh = torch.mm(dy, down_EDI[e])  # (n, I)
            dgu = torch.empty_like(gu)
            torch.mul(dh * up, sig * (1 + gate * (1 - sig)), out=dgu[:, :I])  # silu'(g) = s (1 + g (1 - s))
            torch.mul(dh, act, out=dgu[:, I:])
            if need_w1:
                torch.mm(dgu.t(), x_ND[start:end], out=dw1[e])  # dL/dW1 = dgu^T x
            if need_b1:
                torch.sum(dgu, dim=0, out=db1[e])
            if need_x:
                torch.mm(dgu, gate_up_EHD[e], out=dx_ND[start:end])  # dL/dx = dgu W1
            start = end
        return dx_ND, dw1, dw2, db1, db2, None


def _bias(bias, e):
    return bias[e] if bias is not None else None


def _grouped_autograd(x_ND, gate_up_EHD, down_EDI, gate_up_bias_EH, down_bias_ED, counts, act_fn) -> torch.Tensor:
    """The same computation through autograd, for activations other than SiLU."""
    I = down_EDI.shape[-1]
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            gate_up = F.linear(x_ND[start : start + n], gate_up_EHD[e], _bias(gate_up_bias_EH, e))  # (n, 2I)
            outs.append(F.linear(act_fn(gate_up[:, :I]) * gate_up[:, I:], down_EDI[e], _bias(down_bias_ED, e)))
            start += n
    return torch.cat(outs) if outs else x_ND.new_zeros(0, x_ND.shape[-1])


class SortedGather(torch.autograd.Function):
    """x_ND = x_TD[order_N // K]: the token row of each expert-sorted assignment.

    `order_N` holds distinct (token, choice) slots, so the backward scatters with `index_copy` into a (T*K, D)
    buffer and sums the K choices: no `index_add_` (atomics on GPU; on the CPU it was the slowest op of the block,
    up to 13 ms for a single decode token on 2 contended cores).
    """

    @staticmethod
    def forward(ctx, x_TD, order_N, K):
        ctx.save_for_backward(order_N)
        ctx.K, ctx.T = K, x_TD.shape[0]
        return x_TD.index_select(0, order_N // K)

    @staticmethod
    def backward(ctx, dx_ND):
        (order_N,) = ctx.saved_tensors
        T, K = ctx.T, ctx.K
        slots = dx_ND.new_zeros(T * K, dx_ND.shape[-1]).index_copy_(0, order_N, dx_ND)
        return slots.view(T, K, -1).sum(dim=1), None, None


# At or below this many (token, expert) assignments, inference skips sorting and grouping (decode steps).
SMALL_BATCH_ASSIGNMENTS = 8


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def few_token_experts_forward(
    x_TD: torch.Tensor,
    gate_up_proj_EHD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    act_fn,
    gate_up_bias_EH: torch.Tensor | None = None,
    down_bias_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference path for a handful of tokens (batch-1 / small-batch decoding): each assignment runs its expert
    directly on its token's row, with no sort, gather or scatter. Same arguments and result as
    `grouped_experts_forward`; the sentinel E (dropped) is skipped."""
    E = gate_up_proj_EHD.shape[0]
    I = down_proj_EDI.shape[-1]
    y_TD = torch.zeros_like(x_TD)
    weights = weights_TK.to(x_TD.dtype)
    for t, experts in enumerate(indices_TK.tolist()):
        x_1D = x_TD[t : t + 1]
        for k, e in enumerate(experts):
            if e == E:
                continue
            gate_up = F.linear(x_1D, gate_up_proj_EHD[e], _bias(gate_up_bias_EH, e))  # (1, 2I)
            h = act_fn(gate_up[:, :I]) * gate_up[:, I:]  # SwiGLU
            y_TD[t : t + 1] += weights[t, k] * F.linear(h, down_proj_EDI[e], _bias(down_bias_ED, e))
    return y_TD


def grouped_experts_forward(
    x_TD: torch.Tensor,
    gate_up_proj_EHD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    act_fn,
    gate_up_bias_EH: torch.Tensor | None = None,
    down_bias_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run each token through its experts and sum the weighted outputs.

    Tokens are sorted by expert so that each expert's tokens are one contiguous slice, and each expert does
    one GEMM for its whole group (no per-token loop, no full (E, T, D) tensor). With SiLU (SwiGLU) the grouped
    GEMMs run in `GroupedSwiGLU`, whose backward writes each expert's weight gradient once.

    Args:
        x_TD: expert input, shape (T, D).
        gate_up_proj_EHD: fused gate and up weights, shape (E, 2I, D).
        down_proj_EDI: down weights, shape (E, D, I).
        indices_TK: expert per assignment, shape (T, K); the value E marks a dropped assignment.
        weights_TK: routing weight per assignment, shape (T, K) (float32 from the router).
        act_fn: the gate activation (SiLU for SwiGLU).
        gate_up_bias_EH, down_bias_ED: optional expert biases, shapes (E, 2I) and (E, D) (Llama `mlp_bias`).
    Returns:
        y_TD: sum over k of weights_TK[t, k] * expert_{indices_TK[t, k]}(x_TD[t]), shape (T, D), dtype of x_TD.
        A token whose assignments are all dropped gets zeros, so it passes through the residual unchanged.
    """
    K = indices_TK.shape[1]
    E = gate_up_proj_EHD.shape[0]
    biases = (gate_up_bias_EH, down_bias_ED)
    params = [t for t in (x_TD, gate_up_proj_EHD, down_proj_EDI, *biases) if t is not None]
    if indices_TK.numel() <= SMALL_BATCH_ASSIGNMENTS and not _needs_grad(*params):
        return few_token_experts_forward(x_TD, gate_up_proj_EHD, down_proj_EDI, indices_TK, weights_TK, act_fn, *biases)

    flat_expert_N = indices_TK.reshape(-1)  # (T*K,)
    order_N = torch.argsort(flat_expert_N, stable=True)  # assignments grouped by expert, token order inside
    counts = torch.bincount(flat_expert_N, minlength=E + 1)[:E].tolist()  # the sentinel E is counted, then cut
    n_routed = sum(counts)
    order_N = order_N[:n_routed]  # dropped assignments sorted last: cut them
    x_ND = SortedGather.apply(x_TD, order_N, K)  # (N, D): the token row of each sorted assignment

    if isinstance(act_fn, (nn.SiLU, SiLUActivation)) or act_fn is F.silu:
        y_ND = GroupedSwiGLU.apply(x_ND, gate_up_proj_EHD, down_proj_EDI, *biases, counts)
    else:
        y_ND = _grouped_autograd(x_ND, gate_up_proj_EHD, down_proj_EDI, *biases, counts, act_fn)
    # Combine: put each output back in its (token, choice) slot, weight it there, and sum the k choices. No
    # scatter-add: deterministic, one rounding per token in low precision, and no atomics / thread contention;
    # the weights' gradient is an elementwise product, with no gather to undo.
    T, D = x_TD.shape
    slots = y_ND.new_zeros(T * K, D) if n_routed < T * K else y_ND.new_empty(T * K, D)
    slots_TKD = slots.index_copy(0, order_N, y_ND).view(T, K, D)  # dropped slots stay 0
    return (slots_TKD * weights_TK.to(y_ND.dtype).unsqueeze(-1)).sum(dim=1)


@use_experts_implementation
class MoeExperts(nn.Module):
    """E SwiGLU experts stored as two 3-D parameters (Mixtral layout); see the module docstring.

    Plugged into transformers' experts interface: `from_pretrained(..., experts_implementation=...)` or
    `model.set_experts_implementation(...)` swaps `forward` for one of transformers' implementations
    ("grouped_mm", "batched_mm", ...). The default, "eager", is `grouped_experts_forward` below.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        if config.mlp_bias:  # Llama's mlp_bias applies to every FFN, experts included (so upcycling is exact)
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, 2 * self.intermediate_dim))
            self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        else:
            self.gate_up_proj_bias = None
            self.down_proj_bias = None
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """(T, D) tokens, (T, K) expert indices (E = dropped), (T, K) weights -> (T, D) combined expert output."""
        return grouped_experts_forward(
            x_TD,
            self.gate_up_proj,
            self.down_proj,
            indices_TK,
            weights_TK,
            self.act_fn,
            self.gate_up_proj_bias,
            self.down_proj_bias,
        )


__all__ = ["MoeExperts", "grouped_experts_forward"]
