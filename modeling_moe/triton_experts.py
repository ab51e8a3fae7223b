"""Triton grouped SwiGLU experts: forward and backward kernels, optional (the module imports without triton).

Same semantics, dtypes and autograd behaviour as `experts.grouped_experts_forward`; weights use transformers'
Mixtral layout: gate_up_proj (E, 2I, D) with rows [0, I) the gate and [I, 2I) the up projection, down_proj (E, D, I).

Shape legend: T tokens, D hidden size, I expert intermediate size, E experts, K experts per token, N routed
assignments (T*K minus the dropped ones, which carry the sentinel expert index E).

Structure (as `experts.GroupedExperts`): the T*K assignments are sorted by expert (stable), and every kernel works
on rows of that sorted order. Row r belongs to slot `sorted_slot[r]` = t*K + k, token t = slot // K. The autograd
Function computes the unweighted (T*K, D) slots; the weighted combine over k stays a torch bmm, so autograd gives the
routing-weight gradient.

Routing metadata is built with torch ops on the device without a host sync: a fixed-size tile schedule of
cdiv(T*K, BLOCK_M) + E M-tiles (an upper bound on sum over the E+1 groups of cdiv(n_g, BLOCK_M)), each tile mapped to
(group, first row). Group E is the dropped assignments (sorted last); tiles past the last group are idle. Since N is
never read on the host, the per-row buffers are sized T*K; rows of dropped assignments are never read.

Kernels (fp32 accumulation, `tl.dot`):
  _gate_up_swiglu_kernel       forward: gu = x[token] @ W1[e]^T (+b1), token-row gather fused into the A load, gate
                               and up tiles in one program, SwiGLU epilogue h = silu(g) * u; writes h (T*K, I) and
                               keeps the pre-activations gu (T*K, 2I) for the backward.
  _grouped_gemm_scatter_kernel forward down projection (slots[slot] = h @ W2[e]^T + b2) and backward input gradient
                               (dx_slots[slot] = dgu @ W1[e]); each row lands in its slot, each slot is written by
                               exactly one program (no atomics); tiles of the dropped group write zeros.
  _swiglu_backward_kernel      backward: dy = dslots[slot] gathered in the A load, dh = dy @ W2[e], epilogue
                               dgu = [dh * u * silu'(g), dh * silu(g)] from the saved gu.
  _expert_weight_grad_kernel   backward: per-expert reductions over that expert's rows, dW2[e] = dy_e^T h_e (dy
                               gathered by slot, h recomputed from gu in the load) and dW1[e] = dgu_e^T x_e (x
                               gathered by token); also the bias gradients (row sums). An expert with no rows gets
                               exact zeros.
Torch does: the sort and the tile schedule, the sum of dx slots over k (no atomics), and the weighted combine.
Device functions the kernels share: `_tile_rows` (an M-tile's rows, mask and slots), `_gathered_rows` (the row
gather of an operand) and `_gathered_matmul` (a K-loop of gathered A rows times one expert's B).

The weight-gradient kernel runs one program per (expert, output tile) looping over all of that expert's rows, so a
heavily loaded expert is a long serial loop (no split-K). Verified here only in triton's CPU interpreter (fp32 and
fp16; the interpreter mishandles bf16) and by compiling the kernels for sm_90 ahead of time; speed was not measured.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable (e.g. as Hub remote code) without triton
    triton = None
    tl = None


# `triton.jit` picks the CPU interpreter when TRITON_INTERPRET=1 at decoration (import) time.
_KERNELS_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def _interpreting() -> bool:
    """The interpreter is on now (TRITON_INTERPRET=1) and was on when this module defined its kernels."""
    return os.environ.get("TRITON_INTERPRET") == "1" and _KERNELS_INTERPRETED


def triton_available(x: torch.Tensor) -> bool:
    """True when triton is importable and `x` is on a CUDA device, or triton's CPU interpreter is on
    (TRITON_INTERPRET=1, set before this module was imported)."""
    return triton is not None and (x.is_cuda or _interpreting())


def _block_sizes(device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): small tiles under the (slow) interpreter, larger ones on CUDA."""
    if device.type == "cuda" and not _KERNELS_INTERPRETED:
        return 64, 64, 32, 4
    return 16, 16, 16, 1


if triton is not None:

    @triton.jit
    def _tile_rows(tile_row_ptr, group_start_ptr, sorted_slot_ptr, tile, e, BLOCK_M: tl.constexpr):
        # M-tile `tile` of group e: its BLOCK_M sorted rows, which of them belong to the group, and their slots
        row0 = tl.load(tile_row_ptr + tile)
        row_end = tl.load(group_start_ptr + e + 1)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        slot = tl.load(sorted_slot_ptr + rows, mask=row_mask, other=0)
        return rows, row_mask, slot

    @triton.jit
    def _gathered_rows(rows, slot, top_k, GATHER: tl.constexpr):
        # the operand row of each sorted row: 0 the sorted row itself, 1 its slot t*K + k, 2 its token t
        if GATHER == 0:
            out = rows.to(tl.int64)
        elif GATHER == 1:
            out = slot.to(tl.int64)
        else:
            out = (slot // top_k).to(tl.int64)
        return out

    @triton.jit
    def _gathered_matmul(
        a_ptr, a_rows, stride_ar, stride_ak, row_mask, b_ptr, stride_br, stride_bn, cols, col_mask, R, r_end, ks,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # (BLOCK_M, BLOCK_N) float32: sum over r < r_end of A[a_rows, r] * B[r, cols], the A rows gathered (a_rows),
        # B one expert's (R, N) matrix at b_ptr, in steps of BLOCK_K (ks = arange(0, BLOCK_K)); masked rows,
        # columns and r >= R contribute zeros
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, r_end, BLOCK_K):
            kk = k0 + ks
            k_mask = kk < R
            a = tl.load(
                a_ptr + a_rows[:, None] * stride_ar + kk[None, :] * stride_ak,
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_K)
            b = tl.load(
                b_ptr + kk[:, None] * stride_br + cols[None, :] * stride_bn,
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_N)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _gate_up_swiglu_kernel(
        x_ptr,  # (T, D)
        w1_ptr,  # (E, 2I, D)
        b1_ptr,  # (E, 2I) or dummy
        gu_ptr,  # out (T*K, 2I): pre-activations [gate | up], by sorted row
        h_ptr,  # out (T*K, I): silu(gate) * up, by sorted row
        sorted_slot_ptr,  # (T*K,) slot t*K + k of each sorted row
        group_start_ptr,  # (E+2,) first sorted row of each group (group E = dropped), then T*K
        tile_group_ptr,  # (num_tiles,) group of each M-tile (E+1 = idle tile)
        tile_row_ptr,  # (num_tiles,) first sorted row of each M-tile
        top_k,
        num_experts,
        I,
        D,
        stride_xt,
        stride_xd,
        stride_we,
        stride_wh,
        stride_wd,
        stride_be,
        stride_bh,
        stride_gur,
        stride_hr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_group_ptr + tile)
        if e >= num_experts:  # dropped assignments and idle tiles: nothing to compute
            return
        rows, row_mask, slot = _tile_rows(tile_row_ptr, group_start_ptr, sorted_slot_ptr, tile, e, BLOCK_M)
        token = (slot // top_k).to(tl.int64)  # fused gather: A rows are x[token]
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < I
        ks = tl.arange(0, BLOCK_K)
        w_base = w1_ptr + e.to(tl.int64) * stride_we
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            k_mask = kk < D
            a = tl.load(
                x_ptr + token[:, None] * stride_xt + kk[None, :] * stride_xd,
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_K)
            w_mask = k_mask[:, None] & col_mask[None, :]
            w_gate = tl.load(w_base + cols[None, :] * stride_wh + kk[:, None] * stride_wd, mask=w_mask, other=0.0)
            w_up = tl.load(w_base + (cols + I)[None, :] * stride_wh + kk[:, None] * stride_wd, mask=w_mask, other=0.0)
            acc_g = tl.dot(a, w_gate, acc_g, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            acc_u = tl.dot(a, w_up, acc_u, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            b_base = b1_ptr + e.to(tl.int64) * stride_be
            acc_g += tl.load(b_base + cols * stride_bh, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b_base + (cols + I) * stride_bh, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        out_dtype = gu_ptr.dtype.element_ty
        gate = acc_g.to(out_dtype)
        up = acc_u.to(out_dtype)
        out_mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        tl.store(gu_ptr + rows64[:, None] * stride_gur + cols[None, :], gate, mask=out_mask)
        tl.store(gu_ptr + rows64[:, None] * stride_gur + (cols + I)[None, :], up, mask=out_mask)
        # SwiGLU (Shazeer 2020, Eq. 6): h = silu(x W_gate) * (x W_up), from the stored (rounded) gate and up, so the
        # backward, which recomputes h from gu, sees the same values.
        g = gate.to(tl.float32)
        h = g * tl.sigmoid(g) * up.to(tl.float32)
        tl.store(h_ptr + rows64[:, None] * stride_hr + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _grouped_gemm_scatter_kernel(
        a_ptr,  # (T*K, R) by sorted row: h (R = I) or dgu (R = 2I)
        b_ptr,  # per expert e, B[e][r, n] at b_ptr + e*stride_be + r*stride_br + n*stride_bn (W2^T or W1)
        bias_ptr,  # (E, N_OUT) or dummy
        out_ptr,  # (T*K, N_OUT) by slot
        sorted_slot_ptr,
        group_start_ptr,
        tile_group_ptr,
        tile_row_ptr,
        num_experts,
        N_OUT,
        R,
        stride_ar,
        stride_ak,
        stride_be,
        stride_br,
        stride_bn,
        stride_biase,
        stride_biasn,
        stride_or,
        stride_on,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_group_ptr + tile)
        if e > num_experts:  # idle tile
            return
        rows, row_mask, slot = _tile_rows(tile_row_ptr, group_start_ptr, sorted_slot_ptr, tile, e, BLOCK_M)
        slot = slot.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N_OUT
        ks = tl.arange(0, BLOCK_K)
        is_expert = e < num_experts
        r_end = tl.where(is_expert, R, 0)  # the dropped group (e == E) skips the GEMM and writes zeros
        b_base = b_ptr + e.to(tl.int64) * stride_be
        acc = _gathered_matmul(
            a_ptr, rows.to(tl.int64), stride_ar, stride_ak, row_mask, b_base, stride_br, stride_bn, cols, col_mask,
            R, r_end, ks, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if HAS_BIAS:
            e_bias = tl.minimum(e, num_experts - 1).to(tl.int64)  # the dropped group reads expert E-1, discarded
            bias = tl.load(bias_ptr + e_bias * stride_biase + cols * stride_biasn, mask=col_mask, other=0.0)
            acc += tl.where(is_expert, bias.to(tl.float32), 0.0)[None, :]
        out = out_ptr + slot[:, None] * stride_or + cols[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    @triton.jit
    def _swiglu_backward_kernel(
        dslots_ptr,  # (T*K, D) by slot: gradient of the unweighted slots
        w2_ptr,  # (E, D, I)
        gu_ptr,  # (T*K, 2I) by sorted row
        dgu_ptr,  # out (T*K, 2I) by sorted row
        sorted_slot_ptr,
        group_start_ptr,
        tile_group_ptr,
        tile_row_ptr,
        num_experts,
        I,
        D,
        stride_dsr,
        stride_dsd,
        stride_we,
        stride_wd,
        stride_wi,
        stride_gur,
        stride_dgur,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_group_ptr + tile)
        if e >= num_experts:
            return
        rows, row_mask, slot = _tile_rows(tile_row_ptr, group_start_ptr, sorted_slot_ptr, tile, e, BLOCK_M)
        slot = slot.to(tl.int64)  # fused gather of dy rows
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < I
        ks = tl.arange(0, BLOCK_K)
        w_base = w2_ptr + e.to(tl.int64) * stride_we
        # dh = dy @ W2[e]: dy rows gathered by slot, B[d, i] = W2[e][d, i]
        dh = _gathered_matmul(
            dslots_ptr, slot, stride_dsr, stride_dsd, row_mask, w_base, stride_wd, stride_wi, cols, col_mask,
            D, D, ks, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        gu_rows = gu_ptr + rows64[:, None] * stride_gur
        g = tl.load(gu_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_rows + (cols + I)[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        d_gate = dh * u * (s * (1.0 + g * (1.0 - s)))  # silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
        d_up = dh * (g * s)  # d/du [silu(g) u] = silu(g)
        dgu_rows = dgu_ptr + rows64[:, None] * stride_dgur
        out_dtype = dgu_ptr.dtype.element_ty
        tl.store(dgu_rows + cols[None, :], d_gate.to(out_dtype), mask=mask)
        tl.store(dgu_rows + (cols + I)[None, :], d_up.to(out_dtype), mask=mask)

    @triton.jit
    def _expert_weight_grad_kernel(
        l_ptr,  # left operand rows (reduced over): dy by slot (for dW2) or dgu by sorted row (for dW1)
        r_ptr,  # right operand rows: gu by sorted row (h recomputed, for dW2) or x by token (for dW1)
        out_ptr,  # (E, M_OUT, N_OUT): out[e] = sum over the rows r of expert e of L[r]^T R[r]
        bias_out_ptr,  # (E, M_OUT) row sums of L (bias gradient), or dummy
        sorted_slot_ptr,
        group_start_ptr,
        top_k,
        M_OUT,
        N_OUT,
        I,
        stride_lr,
        stride_lc,
        stride_rr,
        stride_rc,
        stride_oe,
        stride_om,
        stride_on,
        stride_bias_e,
        stride_bias_m,
        L_GATHER: tl.constexpr,  # 0: sorted row, 1: slot, 2: token
        R_GATHER: tl.constexpr,
        R_SWIGLU: tl.constexpr,  # R[r, n] = silu(gu[r, n]) * gu[r, n + I], SwiGLU recomputed in the load
        BIAS_SUM: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        e = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        start = tl.load(group_start_ptr + e)
        end = tl.load(group_start_ptr + e + 1)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = ms < M_OUT
        n_mask = ns < N_OUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):  # no rows: acc stays exactly zero
            rs = r0 + tl.arange(0, BLOCK_R)
            r_mask = rs < end
            slot = tl.load(sorted_slot_ptr + rs, mask=r_mask, other=0)
            l_row = _gathered_rows(rs, slot, top_k, L_GATHER)
            r_row = _gathered_rows(rs, slot, top_k, R_GATHER)
            lt = tl.load(
                l_ptr + l_row[:, None] * stride_lr + ms[None, :] * stride_lc,
                mask=r_mask[:, None] & m_mask[None, :],
                other=0.0,
            )  # (BLOCK_R, BLOCK_M)
            r_mask2 = r_mask[:, None] & n_mask[None, :]
            r_base = r_ptr + r_row[:, None] * stride_rr
            if R_SWIGLU:
                g = tl.load(r_base + ns[None, :] * stride_rc, mask=r_mask2, other=0.0).to(tl.float32)
                u = tl.load(r_base + (ns + I)[None, :] * stride_rc, mask=r_mask2, other=0.0).to(tl.float32)
                rt = (g * tl.sigmoid(g) * u).to(lt.dtype)  # h = silu(g) * u (SwiGLU, Shazeer 2020, Eq. 6)
            else:
                rt = tl.load(r_base + ns[None, :] * stride_rc, mask=r_mask2, other=0.0).to(lt.dtype)
            acc = tl.dot(tl.trans(lt), rt, acc, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            if BIAS_SUM:
                bias_acc += tl.sum(lt.to(tl.float32), axis=0)
        e64 = e.to(tl.int64)
        out = out_ptr + e64 * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
        if BIAS_SUM:
            bias_out = bias_out_ptr + e64 * stride_bias_e + ms * stride_bias_m
            tl.store(bias_out, bias_acc.to(bias_out_ptr.dtype.element_ty), mask=m_mask & ((ms * 0 + pid_n) == 0))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (torch's default for fp32 matmul), not TF32. fp16/bf16: the flag is moot.
    return "ieee" if dtype == torch.float32 else "tf32"


def _routing_schedule(indices_TK: torch.Tensor, num_experts: int, block_m: int):
    """Sort the T*K assignments by expert and build the fixed-size M-tile schedule, with torch ops and no host sync.

    Returns sorted_slot (T*K,) int64: the slot t*K + k of each sorted row, groups 0..E-1 the experts and group E the
    dropped assignments (sentinel E sorts last); group_start (E+2,) int64: first sorted row of each group, then T*K;
    tile_group (num_tiles,) int64: group of each M-tile, E+1 for idle tiles; tile_row (num_tiles,) int64: first sorted
    row of each tile. num_tiles = cdiv(T*K, BLOCK_M) + E bounds sum over the E+1 groups of cdiv(n_g, BLOCK_M).
    """
    device = indices_TK.device
    flat = indices_TK.reshape(-1)
    total = flat.numel()
    num_groups = num_experts + 1
    sorted_expert, sorted_slot = torch.sort(flat, stable=True)
    # group_start[g] = first sorted row with expert >= g: per-group offsets without bincount's max() host sync.
    group_start = torch.searchsorted(sorted_expert, torch.arange(num_groups + 1, device=device, dtype=flat.dtype))
    counts = group_start[1:] - group_start[:-1]  # (E+1,), the dropped group last
    tiles_per_group = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per_group, 0)  # (E+1,)
    num_tiles = triton.cdiv(total, block_m) + num_experts
    tile_ids = torch.arange(num_tiles, device=device, dtype=tile_end.dtype)
    tile_group = torch.searchsorted(tile_end, tile_ids, right=True)  # E+1 past the last tile of the last group
    g = tile_group.clamp(max=num_groups - 1)
    first_tile = tile_end[g] - tiles_per_group[g]
    tile_row = group_start[g] + (tile_ids - first_tile) * block_m
    return sorted_slot.contiguous(), group_start.contiguous(), tile_group.contiguous(), tile_row.contiguous()


def _grouped_gemm_scatter(a_rows, b, b_strides, bias, out, schedule, num_experts, precision, blocks) -> None:
    """out[slot] = a_rows[row] @ B[e] (+ bias[e]) for every sorted row r of expert e, slot = sorted_slot[r]; the
    dropped group's slots get zeros. B[e][r, n] is at b + e*b_strides[0] + r*b_strides[1] + n*b_strides[2].

    Shapes: a_rows (T*K, R) by sorted row, bias (E, N_OUT) or None, out (T*K, N_OUT) by slot (written in place).
    """
    block_m, block_n, block_k, num_warps = blocks
    tile_group = schedule[2]
    has_bias = bias is not None
    bias = bias if has_bias else out  # dummy pointer, never read
    _grouped_gemm_scatter_kernel[(tile_group.shape[0], triton.cdiv(out.shape[1], block_n))](
        a_rows, b, bias, out,
        *schedule,
        num_experts, out.shape[1], a_rows.shape[1],
        a_rows.stride(0), a_rows.stride(1),
        *b_strides,
        bias.stride(0), bias.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=has_bias, DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip


def _expert_weight_grads(left, right, weight, need_w, need_b, schedule, K, I, precision, blocks, *, gather, r_swiglu):
    """Per expert e, the sum over its rows r of left[r]^T right[r], shaped like `weight` (E, M, N), and the row sums
    of left (E, M) (the bias gradient); None for what is not needed. `gather` = (left, right) row gathers, each 0
    (sorted row), 1 (slot) or 2 (token); `r_swiglu`: right is gu and the kernel uses silu(g) * u, g and u its
    columns [0, I) and [I, 2I)."""
    block_m, block_n, _, num_warps = blocks
    sorted_slot, group_start = schedule[:2]
    E, M, N = weight.shape
    dw = torch.empty_like(weight) if need_w else weight.new_empty(E, M, N)
    db = weight.new_empty(E, M) if need_b else dw
    _expert_weight_grad_kernel[(E, triton.cdiv(M, block_n), triton.cdiv(N, block_n))](
        left, right, dw, db,
        sorted_slot, group_start,
        K, M, N, I,
        left.stride(0), left.stride(1),
        right.stride(0), right.stride(1),
        *dw.stride(),
        db.stride(0), db.stride(1),
        L_GATHER=gather[0], R_GATHER=gather[1], R_SWIGLU=r_swiglu, BIAS_SUM=need_b, DOT_PRECISION=precision,
        BLOCK_M=block_n, BLOCK_N=block_n, BLOCK_R=block_m, num_warps=num_warps,
    )  # fmt: skip
    return dw if need_w else None, db if need_b else None


class TritonGroupedExperts(torch.autograd.Function):
    """SwiGLU experts with Triton kernels: (T, D) input -> (T*K, D) unweighted slots, zero in dropped slots.

    Inputs: x_TD (T, D); gate_up_EHD (E, 2I, D); down_EDI (E, D, I); optional gate_up_bias_EH (E, 2I) and
    down_bias_ED (E, D) (or None); the routing schedule of `_routing_schedule`; K; block sizes.
    Saved for the backward: x, both weights, the schedule and the pre-activations gu (T*K, 2I) (rows of dropped
    assignments unused); h is recomputed from gu inside the dW2 kernel, silu and its derivative in the dgu epilogue.
    """

    @staticmethod
    def forward(
        ctx, x_TD, gate_up_EHD, down_EDI, gate_up_bias_EH, down_bias_ED, sorted_slot, group_start, tile_group,
        tile_row, K, blocks,
    ):  # fmt: skip
        T, D = x_TD.shape
        E, H, _ = gate_up_EHD.shape
        I = H // 2
        TK = T * K
        block_m, block_n, block_k, num_warps = blocks
        precision = _dot_precision(x_TD.dtype)
        num_tiles = tile_group.shape[0]
        gu = x_TD.new_empty(TK, H)
        h = x_TD.new_empty(TK, I)
        slots = x_TD.new_empty(TK, D)
        ctx.K, ctx.blocks = K, blocks
        if TK == 0:  # no tokens: no launch with empty buffers
            ctx.save_for_backward(x_TD, gate_up_EHD, down_EDI, gu, sorted_slot, group_start, tile_group, tile_row)
            return slots
        has_b1 = gate_up_bias_EH is not None
        b1 = gate_up_bias_EH if has_b1 else gu  # dummy pointer, never read
        _gate_up_swiglu_kernel[(num_tiles, triton.cdiv(I, block_n))](
            x_TD, gate_up_EHD, b1, gu, h,
            sorted_slot, group_start, tile_group, tile_row,
            K, E, I, D,
            x_TD.stride(0), x_TD.stride(1),
            *gate_up_EHD.stride(),
            b1.stride(0), b1.stride(1),
            gu.stride(0), h.stride(0),
            HAS_BIAS=has_b1, DOT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        )  # fmt: skip
        # down: slots[slot] = h @ W2[e]^T + b2, i.e. B[e][i, d] = W2[e, d, i]
        schedule = (sorted_slot, group_start, tile_group, tile_row)
        down_strides = (down_EDI.stride(0), down_EDI.stride(2), down_EDI.stride(1))
        _grouped_gemm_scatter(h, down_EDI, down_strides, down_bias_ED, slots, schedule, E, precision, blocks)
        ctx.save_for_backward(x_TD, gate_up_EHD, down_EDI, gu, sorted_slot, group_start, tile_group, tile_row)
        return slots

    @staticmethod
    def backward(ctx, dslots):
        x_TD, gate_up_EHD, down_EDI, gu, sorted_slot, group_start, tile_group, tile_row = ctx.saved_tensors
        K, blocks = ctx.K, ctx.blocks
        block_m, block_n, block_k, num_warps = blocks
        T, D = x_TD.shape
        E, H, _ = gate_up_EHD.shape
        I = H // 2
        TK = T * K
        precision = _dot_precision(x_TD.dtype)
        num_tiles = tile_group.shape[0]
        need_x, need_w1, need_w2, need_b1, need_b2 = ctx.needs_input_grad[:5]
        dslots = dslots.contiguous()
        dx = dw1 = dw2 = db1 = db2 = None
        if TK == 0:
            zeros = (x_TD.new_zeros(T, D), torch.zeros_like(gate_up_EHD), torch.zeros_like(down_EDI))
            dx, dw1, dw2 = (z if need else None for z, need in zip(zeros, (need_x, need_w1, need_w2)))
            db1 = gate_up_EHD.new_zeros(E, H) if need_b1 else None
            db2 = down_EDI.new_zeros(E, D) if need_b2 else None
            return dx, dw1, dw2, db1, db2, None, None, None, None, None, None
        schedule = (sorted_slot, group_start, tile_group, tile_row)
        if need_w2 or need_b2:
            # dW2[e] (D, I) = dy_e^T h_e; db2[e] = sum of dy_e rows. L = dy gathered by slot, R = h from gu.
            dw2, db2 = _expert_weight_grads(
                dslots, gu, down_EDI, need_w2, need_b2, schedule, K, I, precision, blocks,
                gather=(1, 0), r_swiglu=True,
            )  # fmt: skip
        if need_x or need_w1 or need_b1:
            dgu = gu.new_empty(TK, H)
            _swiglu_backward_kernel[(num_tiles, triton.cdiv(I, block_n))](
                dslots, down_EDI, gu, dgu,
                sorted_slot, group_start, tile_group, tile_row,
                E, I, D,
                dslots.stride(0), dslots.stride(1),
                *down_EDI.stride(),
                gu.stride(0), dgu.stride(0),
                DOT_PRECISION=precision,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
            )  # fmt: skip
            if need_w1 or need_b1:
                # dW1[e] (2I, D) = dgu_e^T x_e; db1[e] = sum of dgu_e rows. L = dgu by sorted row, R = x by token.
                dw1, db1 = _expert_weight_grads(
                    dgu, x_TD, gate_up_EHD, need_w1, need_b1, schedule, K, I, precision, blocks,
                    gather=(0, 2), r_swiglu=False,
                )  # fmt: skip
            if need_x:
                # dx slots = dgu @ W1[e] (B[e][h, d] = W1[e, h, d]), zero in dropped slots; summed over k in torch.
                dx_slots = x_TD.new_empty(TK, D)
                _grouped_gemm_scatter(
                    dgu, gate_up_EHD, gate_up_EHD.stride(), None, dx_slots, schedule, E, precision, blocks
                )
                dx = dx_slots.view(T, K, D).sum(dim=1)
        return dx, dw1, dw2, db1, db2, None, None, None, None, None, None


def is_silu(act_fn) -> bool:
    """Whether `act_fn` is SiLU (the gate of SwiGLU), the activation the fused kernels implement."""
    return isinstance(act_fn, (nn.SiLU, SiLUActivation)) or act_fn is F.silu


def triton_experts_forward(
    x_TD: torch.Tensor,
    gate_up_proj_EHD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    act_fn,
    gate_up_bias_EH: torch.Tensor | None = None,
    down_bias_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `experts.grouped_experts_forward`: same arguments, result, dtypes and gradients.

    Args:
        x_TD: expert input, shape (T, D).
        gate_up_proj_EHD: fused gate and up weights, shape (E, 2I, D).
        down_proj_EDI: down weights, shape (E, D, I).
        indices_TK: expert per assignment, shape (T, K); the value E marks a dropped assignment.
        weights_TK: routing weight per assignment, shape (T, K) (float32 from the router).
        act_fn: must be SiLU (SwiGLU); anything else raises.
        gate_up_bias_EH, down_bias_ED: optional expert biases, shapes (E, 2I) and (E, D).
    Returns:
        y_TD: sum over k of weights_TK[t, k] * expert_{indices_TK[t, k]}(x_TD[t]), shape (T, D), dtype of x_TD.
    """
    if not is_silu(act_fn):
        raise NotImplementedError(f"triton_experts_forward implements SwiGLU only (SiLU gate); got act_fn={act_fn!r}")
    if triton is None:
        raise RuntimeError("triton_experts_forward needs triton, which is not installed")
    if not triton_available(x_TD):
        raise RuntimeError(
            "triton_experts_forward needs a CUDA tensor (or TRITON_INTERPRET=1 set before importing this module); "
            f"got a tensor on {x_TD.device}"
        )
    dtypes = {t.dtype for t in (x_TD, gate_up_proj_EHD, down_proj_EDI, gate_up_bias_EH, down_bias_ED) if t is not None}
    if len(dtypes) != 1:
        raise TypeError(
            f"triton_experts_forward needs one dtype for x, weights and biases; got {sorted(map(str, dtypes))}"
        )
    T, D = x_TD.shape
    K = indices_TK.shape[1]
    E = gate_up_proj_EHD.shape[0]
    blocks = _block_sizes(x_TD.device)
    schedule = _routing_schedule(indices_TK, E, blocks[0])
    slots = TritonGroupedExperts.apply(
        x_TD.contiguous(), gate_up_proj_EHD, down_proj_EDI, gate_up_bias_EH, down_bias_ED, *schedule, K, blocks
    )
    # Combine: each token's K slot outputs weighted and summed in one batched matmul, (T, 1, K) @ (T, K, D).
    return torch.bmm(weights_TK.to(slots.dtype).unsqueeze(1), slots.view(T, K, D)).squeeze(1)


def _moe_triton_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """transformers experts-interface entry point ("moe_triton"): an experts module's forward on Triton kernels."""
    return triton_experts_forward(
        hidden_states,
        self.gate_up_proj,
        self.down_proj,
        top_k_index,
        top_k_weights,
        self.act_fn,
        getattr(self, "gate_up_proj_bias", None),
        getattr(self, "down_proj_bias", None),
    )


if triton is not None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("moe_triton", _moe_triton_experts)


__all__ = ["TritonGroupedExperts", "triton_available", "triton_experts_forward"]
