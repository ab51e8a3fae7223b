"""Experts: 3-D SwiGLU weights and one entry point, `experts_forward(x, indices, weights)`.

`experts_forward` picks among exact implementations of the same sum (each tested against a plain loop):
    few_token_experts_forward  a handful of assignments on the CPU: each hit expert once on its rows, no sort
    gathered_experts_forward   a handful of assignments on CUDA: gathered weights, static shapes, no host sync
    triton_experts_forward     CUDA with triton (triton_experts.py): fused gather / SwiGLU / scatter kernels
    grouped_experts_forward    everything else: sort -> one GEMM pair per expert group (`GroupedExperts`), or
                               batched GEMMs over the zero-padded groups (`PaddedExperts`) -> weighted combine

Shape legend: T tokens, D hidden size, I expert intermediate size, E experts, K experts per token,
N routed assignments (T*K minus dropped ones).

The weight layout is transformers' Mixtral layout, so conversion is a rename:
    gate_up_proj (E, 2I, D): rows [0, I) are the gate projection, rows [I, 2I) the up projection.
    down_proj    (E, D, I).
    gate_up_proj_bias (E, 2I), down_proj_bias (E, D): only with `config.mlp_bias` (transformers' names).
A dropped assignment carries the sentinel index E: it is sorted past the last expert and never computed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .cpu_kernels import cpu_aligned, few_row_linear, padded_matmul, padded_plan
from .triton_experts import is_silu, triton_available, triton_experts_forward


class GroupedExperts(torch.autograd.Function):
    """SwiGLU experts on the assignments of expert-sorted order, gather, weighting and combine included, with a
    hand-written backward.

    For each expert e, its n_e assignments gather their token rows, run gate/up -> SwiGLU -> down as two GEMMs,
    and their outputs, times their routing weights, are added into their tokens' rows of the (T, D) output.
    Nothing of size (T*K, D), (N, D) or (N, 2I) is allocated: on the CPU a buffer above glibc's mmap threshold
    (32 MiB at most) goes back to the OS on every free and page-faults on every call, and the (T, D) output stays
    in cache. The backward writes each expert's weight gradient once (autograd through `W[e]` would allocate a
    full (E, 2I, D) zero gradient per expert it touches) and adds the input gradient into (T, D) the same way.

    Inputs: x_TD (T, D); gate_up_EHD (E, 2I, D); down_EDI (E, D, I); optional biases gate_up_bias_EH (E, 2I) and
    down_bias_ED (E, D) (or None); weights_TK (T, K) routing weights (float32 from the router); order_N: the
    routed (token, choice) slots t*K + k, sorted by expert; counts: assignments per expert (python ints, sum N);
    K; grad: `torch.is_grad_enabled()` at the call (without it nothing is saved). Output: y_TD (T, D) =
    sum_k weights_TK[t, k] * expert(x_TD[t]), accumulated in float32 for 16-bit inputs (one rounding per token,
    as a weighted sum in one GEMM would). Saved for the backward: each expert's (n_e, 2I) gate/up activations, as
    autograd would; SiLU and the product are recomputed. The routing weights' gradient
    dL/dw = <dL/dy_t, expert(x_t)> = <dL/dy_t W2, h> (+ <dL/dy_t, b2>) reuses the backward's dh GEMM.
    """

    @staticmethod
    def forward(ctx, x_TD, gate_up_EHD, down_EDI, gate_up_bias_EH, down_bias_ED, weights_TK, order_N, counts, K, grad):
        T, D = x_TD.shape
        acc_dtype = torch.promote_types(x_TD.dtype, weights_TK.dtype)  # float32 for 16-bit x and router weights
        y_TD = torch.zeros(T, D, dtype=acc_dtype, device=x_TD.device)
        token_N = order_N // K
        weight_N1 = weights_TK.reshape(-1).index_select(0, order_N).unsqueeze(-1)  # (N, 1)
        # `grad`: grad mode was on at the call (inside forward it is always off, and `needs_input_grad` only says
        # which inputs require grad). Without a backward, SwiGLU runs in place on gu and nothing is saved.
        keep = grad and any(ctx.needs_input_grad[:6])
        I = down_EDI.shape[-1]
        gu_per_expert = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            end = start + n
            tokens = token_N[start:end]
            x_nD = x_TD.index_select(0, tokens)
            b1, b2 = _bias(gate_up_bias_EH, e), _bias(down_bias_ED, e)
            gu = _linear(x_nD, gate_up_EHD[e], b1)  # (n, 2I)
            h = F.silu(gu[:, :I], inplace=not keep).mul_(gu[:, I:])  # SwiGLU (Shazeer 2020, Eq. 6), (n, I)
            y = _linear(h, down_EDI[e], b2)  # (n, D)
            w = weight_N1[start:end]
            # combine: y_t += w_tk * expert(x_t) (Shazeer et al. 2017, Eq. 1); the product promotes 16-bit y
            y_TD.index_add_(0, tokens, y.mul_(w) if y.dtype == acc_dtype else y * w)
            if keep:
                gu_per_expert.append(gu)
            start = end
        ctx.save_for_backward(x_TD, gate_up_EHD, down_EDI, down_bias_ED, weight_N1, order_N, *gu_per_expert)
        ctx.counts, ctx.K = counts, K
        return y_TD.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, gate_up_EHD, down_EDI, down_bias_ED, weight_N1, order_N, *gu_per_expert = ctx.saved_tensors
        K, (T, D) = ctx.K, x_TD.shape
        I = down_EDI.shape[-1]
        need_x, need_w1, need_w2, need_b1, need_b2, need_weights = ctx.needs_input_grad[:6]
        acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)
        dx_TD = torch.zeros(T, D, dtype=acc_dtype, device=x_TD.device) if need_x else None
        dw1 = torch.empty_like(gate_up_EHD) if need_w1 else None
        dw2 = torch.empty_like(down_EDI) if need_w2 else None
        db1 = gate_up_EHD.new_zeros(gate_up_EHD.shape[:2]) if need_b1 else None  # (E, 2I)
        db2 = down_EDI.new_zeros(down_EDI.shape[:2]) if need_b2 else None  # (E, D)
        dweight_N = weight_N1.new_zeros(T * K) if need_weights else None  # dropped assignments: 0
        dy_TD = dy_TD.contiguous()
        token_N = order_N // K
        gu_iter = iter(gu_per_expert)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                if need_w1:
                    dw1[e].zero_()
                if need_w2:
                    dw2[e].zero_()
                continue
            end = start + n
            tokens = token_N[start:end]
            gu = next(gu_iter)  # (n, 2I)
            gate, up = gu[:, :I], gu[:, I:]
            act = F.silu(gate)  # (n, I)
            h = act * up  # (n, I)
            dy = dy_TD.index_select(0, tokens)  # (n, D): dL/d(expert output), before the routing weight
            dh = torch.mm(dy, down_EDI[e])  # (n, I)
            if need_weights:  # dL/dw = <dy, h W2^T + b2> = <dy W2, h> + <dy, b2>
                dweight = torch.linalg.vecdot(dh, h).float()
                if down_bias_ED is not None:
                    dweight += torch.mv(dy, down_bias_ED[e]).float()
                dweight_N.index_copy_(0, order_N[start:end], dweight.to(dweight_N.dtype))
            w = weight_N1[start:end].to(dy.dtype)
            dy.mul_(w)  # through the routing weight
            dh.mul_(w)
            if need_w2:
                torch.mm(dy.t(), h, out=dw2[e])  # dL/dW2 = dy^T h
            if need_b2:
                torch.sum(dy, dim=0, out=db2[e])
            dgu = torch.empty_like(gu)
            torch.mul(dh, act, out=dgu[:, I:])  # d up = dh * silu(g)
            # d gate = dh * up * silu'(g), silu'(g) = s (1 + g (1 - s)): ATen's fused kernel, in place in dgu (one
            # pass and, in 16-bit, one rounding instead of five elementwise ops)
            d_gate = torch.mul(dh, up, out=dgu[:, :I])
            torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
            if need_w1:
                torch.mm(dgu.t(), x_TD.index_select(0, tokens), out=dw1[e])  # dL/dW1 = dgu^T x
            if need_b1:
                torch.sum(dgu, dim=0, out=db1[e])
            if need_x:  # dL/dx = dgu W1, summed over the token's k assignments
                dx = torch.mm(dgu, gate_up_EHD[e])
                dx_TD.index_add_(0, tokens, dx if dx.dtype == acc_dtype else dx.to(acc_dtype))
            start = end
        dx_TD = dx_TD.to(x_TD.dtype) if need_x else None
        dweights = dweight_N.view(T, K) if need_weights else None
        return dx_TD, dw1, dw2, db1, db2, dweights, None, None, None, None


_COMBINE_CHUNK = 256  # tokens per combine step of `PaddedExperts`


class PaddedExperts(torch.autograd.Function):
    """`GroupedExperts`' computation as batched GEMMs: the expert groups zero-padded to P = max(counts) rows,
    (E, P, D), and each projection one `torch.bmm` per `plan.experts_per_call` experts, in the forward and in the
    backward (`cpu_kernels.padded_plan` says where this is faster than one GEMM pair per expert, and why).

    Same inputs as `GroupedExperts` (order_N as a tensor), with the padded rows' `_PaddedLayout` in place of
    the counts, plus `plan` (a `cpu_kernels.PaddedPlan`); the same result. Padding rows
    are zeros and get a routing weight of 0: they add nothing to the output, and since their rows of dL/dy are
    zero they add exactly nothing to any gradient (a non-finite token cannot leak into them). Saved for the
    backward: the (E, P, 2I) gate/up activations (in the plan's layout); the padded inputs are gathered again.
    The routing weights' gradient is dL/dw = <dL/dy_t W2, h> (+ <dL/dy_t, b2>), as in `GroupedExperts`.
    """

    @staticmethod
    def forward(
        ctx, x_TD, gate_up_EHD, down_EDI, gate_up_bias_EH, down_bias_ED, weights_TK, order_N, layout, K, grad, plan
    ):
        E, _, I = down_EDI.shape
        P = len(layout.rows_R) // E
        keep = grad and any(ctx.needs_input_grad[:6])
        weight_N = weights_TK.reshape(-1).index_select(0, order_N)  # (N,), for the backward
        # the (E, P, 2I) activations when the backward needs them, in the plan's layout (see padded_matmul)
        gu_all = x_TD.new_empty((E, P, 2 * I) if plan.orientation == "xw" else (E, 2 * I, P)) if keep else None
        biases = (gate_up_bias_EH, down_bias_ED)
        out_TD = _padded_forward(x_TD, gate_up_EHD, down_EDI, *biases, weights_TK, layout, plan, gu_all)
        saved = (gu_all,) if keep else ()
        ctx.save_for_backward(
            x_TD, gate_up_EHD, down_EDI, down_bias_ED, weight_N, order_N, layout.slot_N, layout.rows_R, *saved
        )
        ctx.K, ctx.plan = K, plan
        return out_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, gate_up_EHD, down_EDI, down_bias_ED, weight_N, order_N, slot_N, rows_R, gu_all = ctx.saved_tensors
        K, (T, D), (E, _, I) = ctx.K, x_TD.shape, down_EDI.shape
        R, c = len(rows_R), ctx.plan.experts_per_call
        P = R // E
        need_x, need_w1, need_w2, need_b1, need_b2, need_weights = ctx.needs_input_grad[:6]
        acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)
        token_N = order_N // K
        x_EPD = _padded_rows(x_TD, rows_R).view(E, P, D)
        dy_EPD = _padded_rows(dy_TD.contiguous(), rows_R).view(E, P, D)  # before the routing weight
        w_EP1 = weight_N.new_zeros(R).index_copy_(0, slot_N, weight_N).view(E, P, 1).to(dy_TD.dtype)  # padding: 0
        # (E, P, 2I) contiguous: "wx" saved it transposed; it is used with at most 64 rows (a small copy)
        gu_EPH = gu_all if ctx.plan.orientation == "xw" else gu_all.transpose(1, 2).contiguous()
        dx_EPD = torch.empty_like(x_EPD) if need_x else None
        dw1 = torch.empty_like(gate_up_EHD) if need_w1 else None
        dw2 = torch.empty_like(down_EDI) if need_w2 else None
        db1 = gate_up_EHD.new_empty(gate_up_EHD.shape[:2]) if need_b1 else None  # (E, 2I)
        db2 = down_EDI.new_empty(down_EDI.shape[:2]) if need_b2 else None  # (E, D)
        dweight_EP = torch.empty(E, P, dtype=weight_N.dtype, device=x_TD.device) if need_weights else None
        for e0 in range(0, E, c):
            e = slice(e0, min(E, e0 + c))
            gate, up = gu_EPH[e, :, :I], gu_EPH[e, :, I:]
            act = F.silu(gate)  # (c, P, I)
            h = act * up
            dy = dy_EPD[e]
            dh = torch.bmm(dy, down_EDI[e])  # (c, P, I); the weights as stored (cpu_kernels.PaddedPlan)
            if need_weights:  # dL/dw = <dy, h W2^T + b2> = <dy W2, h> + <dy, b2>
                dweight = torch.linalg.vecdot(dh, h).float()
                if down_bias_ED is not None:
                    dweight += torch.linalg.vecdot(dy, down_bias_ED[e].unsqueeze(1)).float()
                dweight_EP[e] = dweight
            w = w_EP1[e]
            dy = dy * w  # through the routing weight
            dh.mul_(w)
            if need_w2:
                torch.bmm(dy.transpose(1, 2), h, out=dw2[e])  # dL/dW2 = dy^T h
            if need_b2:
                torch.sum(dy, dim=1, out=db2[e])
            dgu = torch.empty(*h.shape[:2], 2 * I, dtype=h.dtype, device=h.device)
            torch.mul(dh, act, out=dgu[..., I:])  # d up = dh * silu(g)
            d_gate = torch.mul(dh, up, out=dgu[..., :I])  # d gate = dh * up * silu'(g), ATen's fused kernel
            torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
            if need_w1:
                torch.bmm(dgu.transpose(1, 2), x_EPD[e], out=dw1[e])  # dL/dW1 = dgu^T x
            if need_b1:
                torch.sum(dgu, dim=1, out=db1[e])
            if need_x:
                torch.bmm(dgu, gate_up_EHD[e], out=dx_EPD[e])  # dL/dx = dgu W1
        dx_TD = None
        if need_x:  # summed over each token's k assignments; padding rows are never read
            dx_ND = dx_EPD.view(R, D).index_select(0, slot_N)
            dx_TD = torch.zeros(T, D, dtype=acc_dtype, device=x_TD.device).index_add_(0, token_N, dx_ND.to(acc_dtype))
            dx_TD = dx_TD.to(x_TD.dtype)
        dweights = None
        if need_weights:  # dropped assignments: 0
            dweight_N = dweight_EP.view(R).index_select(0, slot_N)
            dweights = weight_N.new_zeros(T * K).index_copy_(0, order_N, dweight_N).view(T, K)
        return dx_TD, dw1, dw2, db1, db2, dweights, None, None, None, None, None


# At most this many assignments, the expert order and the padded layout are built from host ints (decode-sized
# batches) instead of a dozen tiny kernels: on the CPU each op costs tens of microseconds when it runs right after
# a GEMM has streamed the expert weights through the cache.
_HOST_LAYOUT_MAX = 256


def _expert_order(indices_TK: torch.Tensor, E: int) -> tuple[list[int] | torch.Tensor, list[int]]:
    """The routed assignments t*K + k sorted by expert, token order inside (a stable sort), the dropped ones
    (index E, or above) cut: python ints for at most `_HOST_LAYOUT_MAX` assignments (one host read instead of a
    sort, a bincount and a host read), else an (N,) tensor; and counts, assignments per expert (E python ints
    summing to N). `_order_tensor` gives the tensor form of either."""
    flat_N = indices_TK.reshape(-1)  # (T*K,)
    if flat_N.numel() <= _HOST_LAYOUT_MAX:
        experts = flat_N.tolist()
        if min(experts, default=0) < 0:
            raise ValueError(f"indices_TK: expert indices must be >= 0 (E = {E} marks a dropped assignment)")
        order = sorted((o for o, e in enumerate(experts) if e < E), key=experts.__getitem__)  # stable
        counts = [0] * E
        for o in order:
            counts[experts[o]] += 1
        return order, counts
    order_N = torch.argsort(flat_N, stable=True)  # assignments grouped by expert, token order inside
    counts = torch.bincount(flat_N, minlength=E + 1)[:E].tolist()  # the sentinel E is counted, then cut
    return order_N[: sum(counts)], counts  # dropped assignments sorted last: cut them


def _order_tensor(order: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return order if isinstance(order, torch.Tensor) else torch.tensor(order, dtype=torch.long, device=device)


class _PaddedLayout(NamedTuple):
    """Where each assignment sits in the R = E*P padded rows (expert e's n_e assignments take rows e*P ..
    e*P + n_e - 1, in expert-sorted order); all int64."""

    token_N: torch.Tensor  # (N,) the token of each expert-sorted assignment
    slot_N: torch.Tensor  # (N,) its padded row
    slot_TK: torch.Tensor  # (T, K) the padded row of each token's k-th choice; R (one past them) when dropped
    rows_R: torch.Tensor  # (R,) the token each padded row reads; T (a zero row appended to x) for padding


def _padded_layout(
    order: list[int] | torch.Tensor, counts: list[int], K: int, T: int, P: int, device: torch.device
) -> _PaddedLayout:
    """The `_PaddedLayout` of `_expert_order`'s result: from host ints in one tensor when `order` is a list."""
    E = len(counts)
    R = E * P
    if isinstance(order, list):
        slot_N = [e * P + j for e, n in enumerate(counts) for j in range(n)]
        token_N = [o // K for o in order]
        slot_TK, rows_R = [R] * (T * K), [T] * R
        for o, token, slot in zip(order, token_N, slot_N):
            slot_TK[o], rows_R[slot] = slot, token
        N = len(order)
        packed = torch.tensor(token_N + slot_N + slot_TK + rows_R, dtype=torch.long, device=device)
        token, slot, choice, rows = packed.split([N, N, T * K, R])
        return _PaddedLayout(token, slot, choice.view(T, K), rows)
    N = len(order)
    counts_E = torch.tensor(counts, device=device)
    offset_E = torch.arange(E, device=device) * P - (torch.cumsum(counts_E, 0) - counts_E)  # e*P - start_e
    slot_N = torch.arange(N, device=device) + torch.repeat_interleave(offset_E, counts_E, output_size=N)
    slot_TK = torch.full((T * K,), R, dtype=slot_N.dtype, device=device).index_copy_(0, order, slot_N)
    token_N = order // K
    rows_R = torch.full((R,), T, dtype=slot_N.dtype, device=device).index_copy_(0, slot_N, token_N)
    return _PaddedLayout(token_N, slot_N, slot_TK.view(T, K), rows_R)


def _padded_rows(src_TD: torch.Tensor, rows_R: torch.Tensor) -> torch.Tensor:
    """(R, D): padded row r holds src_TD[rows_R[r]]; rows_R = T reads an appended zero row (padding)."""
    return F.pad(src_TD, (0, 0, 0, 1)).index_select(0, rows_R)


def _padded_forward(
    x_TD, gate_up_EHD, down_EDI, gate_up_bias_EH, down_bias_ED, weights_TK, layout: _PaddedLayout, plan, gu_all
) -> torch.Tensor:
    """`PaddedExperts`' forward (also run directly where nothing needs a gradient, which skips the autograd
    Function's own cost and gives the same bits): y_TD (T, D). gu_all (or None) receives the gate/up
    activations in the plan's layout."""
    T, D = x_TD.shape
    E, _, I = down_EDI.shape
    (R,), K = layout.rows_R.shape, layout.slot_TK.shape[1]
    P, c, orientation = R // E, plan.experts_per_call, plan.orientation
    if plan.aligned_weights:  # the kernels' bits hold at aligned placements only (cpu_kernels.PaddedPlan)
        gate_up_EHD, down_EDI = cpu_aligned(gate_up_EHD), cpu_aligned(down_EDI)
    acc_dtype = torch.promote_types(x_TD.dtype, weights_TK.dtype)  # float32 for 16-bit x and router weights
    # the combine's weights, a dropped choice's zeroed, built before the GEMMs, which stream the weights through
    # the cache (small ops after them run cold)
    dropped = len(layout.slot_N) < T * K
    weight_TK = torch.where(layout.slot_TK == R, 0, weights_TK) if dropped else weights_TK
    weight_T1K = weight_TK.to(acc_dtype).unsqueeze(1)  # (T, 1, K)
    x_EPD = _padded_rows(x_TD, layout.rows_R).view(E, P, D)
    y_RD = None if c == E and not dropped else x_TD.new_empty(R + 1, D)  # padded rows, then a zero row for drops
    if y_RD is not None:
        y_RD[-1].zero_()
    for e0 in range(0, E, c):
        e = slice(e0, min(E, e0 + c))
        gu_out = None if gu_all is None else gu_all[e]
        gu_cPH = padded_matmul(x_EPD[e], gate_up_EHD[e], _bias(gate_up_bias_EH, e), orientation, out=gu_out)
        # SwiGLU (Shazeer 2020, Eq. 6), out of place even without a backward: h is then contiguous, where the
        # in-place form leaves a strided view that the next bmm copies
        h_cPI = F.silu(gu_cPH[..., :I]).mul_(gu_cPH[..., I:])
        if plan.rows_down_input:  # row-major for the down GEMM (cpu_kernels.PaddedPlan)
            h_cPI = h_cPI.contiguous()
        if y_RD is None:  # one call over every expert, no drop: its (E, P, D) result is the padded rows
            y_RD = padded_matmul(h_cPI, down_EDI, _bias(down_bias_ED, e), orientation).reshape(R, D)
        elif orientation == "xw":  # straight into the output rows
            y_cPD = y_RD[e0 * P : e.stop * P].view(-1, P, D)
            padded_matmul(h_cPI, down_EDI[e], _bias(down_bias_ED, e), orientation, out=y_cPD)
        else:
            y_RD[e0 * P : e.stop * P].view(-1, P, D).copy_(
                padded_matmul(h_cPI, down_EDI[e], _bias(down_bias_ED, e), orientation)
            )
    # combine: y_t = sum_k w_tk * expert(x_t) (Shazeer et al. 2017, Eq. 1) as a gather of each token's K rows and
    # a (1, K) @ (K, D) product in the accumulation dtype, in chunks of tokens so the (c, K, D) copies stay in
    # cache; a dropped choice reads the zero row with weight 0
    chunks = [(t0, min(t0 + _COMBINE_CHUNK, T)) for t0 in range(0, T, _COMBINE_CHUNK)]
    out_TD = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device) if len(chunks) > 1 else None
    for t0, t1 in chunks:
        y_cKD = y_RD.index_select(0, layout.slot_TK[t0:t1].reshape(-1)).view(t1 - t0, K, D).to(acc_dtype)
        y_cD = torch.bmm(weight_T1K[t0:t1], y_cKD).squeeze(1)
        if out_TD is None:
            return y_cD.to(x_TD.dtype)
        out_TD[t0:t1] = y_cD
    return out_TD


def _bias(bias, e):
    return bias[e] if bias is not None else None


def _grouped_autograd(
    x_TD, gate_up_EHD, down_EDI, gate_up_bias_EH, down_bias_ED, order_N, counts, K, act_fn
) -> torch.Tensor:
    """`GroupedExperts` through autograd, for activations other than SiLU: (T*K, D) unweighted slots."""
    T, D = x_TD.shape
    I = down_EDI.shape[-1]
    x_ND = x_TD.index_select(0, order_N // K)
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            gate_up = F.linear(x_ND[start : start + n], gate_up_EHD[e], _bias(gate_up_bias_EH, e))  # (n, 2I)
            outs.append(F.linear(act_fn(gate_up[:, :I]) * gate_up[:, I:], down_EDI[e], _bias(down_bias_ED, e)))
            start += n
    y_ND = torch.cat(outs) if outs else x_TD.new_zeros(0, D)
    return x_TD.new_zeros(T * K, D).index_copy(0, order_N, y_ND)


# At or below this many (token, expert) assignments, inference skips sorting and grouping (decode steps).
SMALL_BATCH_ASSIGNMENTS = 8
# float32 CPU GEMMs with at most this many rows run with this CPU's few-row kernel (see `_linear`).
SMALL_GEMM_ROWS = 3


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    """Inference path for a handful of tokens (batch-1 / small-batch decoding): each hit expert runs once on the
    rows of its tokens, with no sort. Same arguments and result as
    `grouped_experts_forward`; the sentinel E (dropped) is skipped.

    The loop reads the expert indices on the host, which `torch.compile` cannot trace; under compilation (e.g.
    `generate(cache_implementation="static")` with a compile config) the SwiGLU case runs as the opaque custom op
    `moe_lm::few_token_swiglu`, so the rest of the decode step compiles into one graph around it."""
    if torch.compiler.is_compiling() and is_silu(act_fn):
        return torch.ops.moe_lm.few_token_swiglu(
            x_TD, gate_up_proj_EHD, down_proj_EDI, indices_TK, weights_TK, gate_up_bias_EH, down_bias_ED
        )
    return _few_token_loop(
        x_TD, gate_up_proj_EHD, down_proj_EDI, indices_TK, weights_TK, act_fn, gate_up_bias_EH, down_bias_ED
    )


def _few_token_loop(
    x_TD, gate_up_proj_EHD, down_proj_EDI, indices_TK, weights_TK, act_fn, gate_up_bias_EH, down_bias_ED
):
    E = gate_up_proj_EHD.shape[0]
    I = down_proj_EDI.shape[-1]
    y_TD = torch.zeros(x_TD.shape, dtype=torch.promote_types(x_TD.dtype, torch.float32), device=x_TD.device)
    # One host read of the routing; each hit expert then runs once on its rows, so its weights are read once. The
    # sum over k accumulates in float32 for 16-bit inputs, as the grouped path does (one rounding per token).
    routes: dict[int, tuple[list[int], list[float]]] = {}
    for t, (experts, weights) in enumerate(zip(indices_TK.tolist(), weights_TK.tolist())):
        for e, w in zip(experts, weights):
            if e != E:
                rows, ws = routes.setdefault(e, ([], []))
                rows.append(t)
                ws.append(w)
    for e, (rows, ws) in routes.items():
        x_nD = x_TD[rows[0] : rows[0] + 1] if len(rows) == 1 else x_TD[rows]
        gate_up = _linear(x_nD, gate_up_proj_EHD[e], _bias(gate_up_bias_EH, e))  # (n, 2I)
        h = act_fn(gate_up[:, :I]).mul_(gate_up[:, I:])  # SwiGLU (Shazeer 2020, Eq. 6)
        y_nD = _linear(h, down_proj_EDI[e], _bias(down_bias_ED, e))  # (n, D)
        if len(rows) == 1:
            y_TD[rows[0]].add_(y_nD[0], alpha=ws[0])
        else:
            w_n1 = torch.tensor(ws, dtype=y_TD.dtype, device=y_TD.device).unsqueeze(-1)
            y_TD.index_add_(0, torch.tensor(rows, device=y_TD.device), y_nD * w_n1)  # (Shazeer et al. 2017, Eq. 1)
    return y_TD.to(x_TD.dtype)


def _linear(x_nD: torch.Tensor, w_OD: torch.Tensor, b_O: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x_nD, w_OD, b_O)`, (n, O). With at most `SMALL_GEMM_ROWS` float32 rows on the CPU the kernel is
    this CPU's few-row kernel (`cpu_kernels.few_row_linear`: MKL's GEMV or one vecdot per row, whichever this
    kind of CPU streams weights faster with and whose bits do not depend on the weights' memory alignment, so a
    checkpoint loaded from safetensors gives the same logits as the model it came from). Other dtypes, devices
    and more rows: `F.linear`."""
    if x_nD.dtype != torch.float32 or x_nD.device.type != "cpu" or x_nD.shape[0] > SMALL_GEMM_ROWS:
        return F.linear(x_nD, w_OD, b_O)
    return few_row_linear(x_nD, w_OD, b_O)


def _few_token_swiglu(x_TD, gate_up_proj_EHD, down_proj_EDI, indices_TK, weights_TK, gate_up_bias_EH, down_bias_ED):
    return _few_token_loop(
        x_TD, gate_up_proj_EHD, down_proj_EDI, indices_TK, weights_TK, F.silu, gate_up_bias_EH, down_bias_ED
    )


# Defined once per process: this file may be imported twice (the installed package and a trust_remote_code copy
# of it), and torch.library refuses a second definition of the same name. The schema is explicit because this
# file's annotations are strings.
if not hasattr(torch.ops.moe_lm, "few_token_swiglu"):
    torch.library.custom_op(
        "moe_lm::few_token_swiglu",
        _few_token_swiglu,
        mutates_args=(),
        schema="(Tensor x, Tensor gate_up, Tensor down, Tensor indices, Tensor weights, Tensor? gate_up_bias, "
        "Tensor? down_bias) -> Tensor",
    ).register_fake(lambda x_TD, *args: torch.empty_like(x_TD))


def experts_forward(
    x_TD: torch.Tensor,
    gate_up_proj_EHD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    act_fn,
    gate_up_bias_EH: torch.Tensor | None = None,
    down_bias_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """The experts computation: y_TD = sum_k weights_TK[:, k] * expert_{indices_TK[:, k]}(x_TD), dropped (E) skipped.

    Every path below is exact against the same plain loop (tests/test_experts.py, tests/test_triton_experts.py);
    this function only picks the fastest one for the inputs:
        few assignments, no grad   CUDA: `gathered_experts_forward` (no host sync: CUDA-graph capturable);
                                   CPU: `few_token_experts_forward` (each hit expert once, no sort).
        CUDA with triton, SwiGLU   `triton_experts_forward` (fused gather/SwiGLU/scatter kernels).
        otherwise                  `grouped_experts_forward` (sorted groups, one GEMM pair per expert).
    """
    args = (x_TD, gate_up_proj_EHD, down_proj_EDI, indices_TK, weights_TK, act_fn, gate_up_bias_EH, down_bias_ED)
    params = (x_TD, gate_up_proj_EHD, down_proj_EDI, gate_up_bias_EH, down_bias_ED)
    if indices_TK.numel() <= SMALL_BATCH_ASSIGNMENTS and not _needs_grad(*params):
        return gathered_experts_forward(*args) if x_TD.is_cuda else few_token_experts_forward(*args)
    if x_TD.is_cuda and triton_available(x_TD) and is_silu(act_fn):
        return triton_experts_forward(*args)
    return grouped_experts_forward(*args)


def gathered_experts_forward(
    x_TD: torch.Tensor,
    gate_up_proj_EHD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    act_fn,
    gate_up_bias_EH: torch.Tensor | None = None,
    down_bias_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """A handful of assignments with static shapes and no host read of the routing: each assignment's expert
    weights are gathered and run as batched GEMVs. For CUDA decoding (graph capture, `torch.compile`); it copies
    the active experts' weights, so it is for a few tokens only. Same arguments and result as `experts_forward`."""
    T, K = indices_TK.shape
    E, D, I = down_proj_EDI.shape
    routed_TK = indices_TK < E
    expert_N = indices_TK.clamp(max=E - 1).reshape(-1)  # (T*K,); dropped ones computed on expert E-1, then zeroed
    x_ND1 = x_TD.repeat_interleave(K, dim=0).unsqueeze(-1)  # (T*K, D, 1)
    gate_up = torch.bmm(gate_up_proj_EHD.index_select(0, expert_N), x_ND1).squeeze(-1)  # (T*K, 2I)
    if gate_up_bias_EH is not None:
        gate_up = gate_up + gate_up_bias_EH.index_select(0, expert_N)
    h_NI1 = (act_fn(gate_up[:, :I]) * gate_up[:, I:]).unsqueeze(-1)  # SwiGLU (Shazeer 2020, Eq. 6)
    y_ND = torch.bmm(down_proj_EDI.index_select(0, expert_N), h_NI1).squeeze(-1)  # (T*K, D)
    if down_bias_ED is not None:
        y_ND = y_ND + down_bias_ED.index_select(0, expert_N)
    y_TKD = torch.where(routed_TK.unsqueeze(-1), y_ND.view(T, K, D), 0)
    return torch.bmm(weights_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)


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
    GEMMs run in `GroupedExperts`, whose backward writes each expert's weight gradient once.

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
    order, counts = _expert_order(indices_TK, E)
    T, device = x_TD.shape[0], x_TD.device
    if is_silu(act_fn):
        grad = torch.is_grad_enabled()
        # not on few-token inputs, so that a forward's bits do not depend on grad mode (without it they take
        # `few_token_experts_forward`, whose kernels GroupedExperts shares)
        plan = padded_plan(x_TD, counts, down_proj_EDI.shape[-1]) if len(order) > SMALL_BATCH_ASSIGNMENTS else None
        if plan is None:
            args = (x_TD, gate_up_proj_EHD, down_proj_EDI, *biases, weights_TK, _order_tensor(order, device))
            return GroupedExperts.apply(*args, counts, K, grad)
        layout = _padded_layout(order, counts, K, T, max(counts), device)
        params = (x_TD, gate_up_proj_EHD, down_proj_EDI, *biases, weights_TK)
        if grad and _needs_grad(*params):
            return PaddedExperts.apply(*params, _order_tensor(order, device), layout, K, grad, plan)
        return _padded_forward(*params, layout, plan, None)  # the same bits, without the Function's cost
    order_N = _order_tensor(order, device)
    slots = _grouped_autograd(x_TD, gate_up_proj_EHD, down_proj_EDI, *biases, order_N, counts, K, act_fn)
    # Combine: each token's k slot outputs weighted and summed in one batched matmul, (T, 1, K) @ (T, K, D)
    return torch.bmm(weights_TK.to(slots.dtype).unsqueeze(1), slots.view(T, K, -1)).squeeze(1)


@use_experts_implementation
class MoeExperts(nn.Module):
    """E SwiGLU experts stored as two 3-D parameters (Mixtral layout); see the module docstring.

    Plugged into transformers' experts interface: `from_pretrained(..., experts_implementation=...)` or
    `model.set_experts_implementation(...)` swaps `forward`. The default, "eager", is `experts_forward` (the
    fastest exact path for the inputs); "moe_grouped" forces `grouped_experts_forward`, "moe_triton" the Triton
    kernels; transformers' own ("grouped_mm", "batched_mm", ...) work where they are exact (no drops, no biases).
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
        return experts_forward(
            x_TD,
            self.gate_up_proj,
            self.down_proj,
            indices_TK,
            weights_TK,
            self.act_fn,
            self.gate_up_proj_bias,
            self.down_proj_bias,
        )


def _moe_grouped_experts(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor):
    """experts-interface entry "moe_grouped": the torch grouped path on any device, no automatic choice."""
    biases = (self.gate_up_proj_bias, self.down_proj_bias)
    return grouped_experts_forward(
        x_TD, self.gate_up_proj, self.down_proj, indices_TK, weights_TK, self.act_fn, *biases
    )


ALL_EXPERTS_FUNCTIONS.register("moe_grouped", _moe_grouped_experts)
# The implementations of this file: exact with dropped assignments and expert biases ("moe_triton" registers
# itself in triton_experts.py when triton is installed).
OUR_EXPERTS_IMPLEMENTATIONS = ("eager", "moe_grouped", "moe_triton")

__all__ = [
    "OUR_EXPERTS_IMPLEMENTATIONS",
    "MoeExperts",
    "experts_forward",
    "gathered_experts_forward",
    "grouped_experts_forward",
]
