"""Which CPU kernels the experts run, chosen by what this kind of CPU does: the float32 linear on a few rows
(`few_row_linear`) and how the grouped experts' GEMMs run (`padded_plan`: one GEMM pair per expert, or batched
GEMMs over the groups zero-padded to the largest one; see its docstring).

The experts' few-token path multiplies each hit expert's weights by 1-3 rows. Two exact kernels compute
`F.linear(x_nD, w_OD)` there:
    "linear"  `F.linear`: MKL's GEMV / small GEMM.
    "vecdot"  one `torch.linalg.vecdot` per input row (a multiply and an ATen reduction over D, on every thread).
Which one is faster depends on the processor (bench/RESULTS.md, one table per CPU kind): on a 2-core AMD EPYC
(avx512_bf16, no AMX) the vecdot kernel streams the weights 2x faster than MKL's GEMV (MKL runs its generic
code path there); on a 2-core Intel Xeon with AMX, MKL's GEMV is the fast one and vecdot is 3-15x slower.

Bits. A checkpoint loaded from safetensors may hold its weights at any offset, and its logits must equal those
of the model it came from, in a fresh process. So a kernel is only used where its bits do not depend on the
weights' (or the input rows') memory alignment: on the AMD EPYC, MKL's GEMV does depend on it, so "linear" is
not eligible there. Eligibility is checked bitwise, once per process and shape, by `_alignment_invariant`.
The choice never depends on a timing: a timing-based choice could differ between two processes and with it
the bits of a forward. It is, for each shape, the first eligible kernel of a fixed preference order:
    GenuineIntel CPUs   ("linear", "vecdot")   (measured on an Intel Xeon with AMX)
    every other CPU     ("vecdot", "linear")   (measured on an AMD EPYC)
"vecdot" is always eligible (ATen's reductions use unaligned vector loads; tested), so the order decides.

`MOE_CPU_FEW_ROW_KERNEL` pins the choice for reproducibility: "auto" (the default, the rule above), "linear"
or "vecdot" (used as asked, without the alignment check). `MOE_CPU_GROUPED_KERNEL` ("auto", "loop", "bmm")
pins `padded_plan`; the batched forms pass the same alignment check before "auto" takes them.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNEL_ENV = "MOE_CPU_FEW_ROW_KERNEL"
GROUPED_KERNEL_ENV = "MOE_CPU_GROUPED_KERNEL"
GROUPED_KERNELS = ("loop", "bmm")
# The padded batched GEMM computes E * max(counts) rows for N assignments: at most this many times N (more rows
# than `FEW_ROWS_MAX_P` per expert; below it the weight bytes, not the rows, are the cost).
PADDED_BMM_MAX_ROWS_RATIO = 1.25
# At most this many rows per expert, the weight bytes are the cost (one batched call over every expert reads them
# at about the rate of a sum; measured up to 64 rows in float32 and 128 in bfloat16: bench/RESULTS.md, third pass).
FEW_ROWS_MAX_P = 64
# float32 with few rows where the few-row kernel is MKL's (Intel): `x @ W^T` up to this many rows per expert,
# `W @ x^T` above (MKL's `x @ W^T` with 7-15 rows runs well below its rate with 1-6 or 16).
FP32_XW_MAX_P = 6
# Elements of the (c, P, 2I) intermediate of one batched call over c experts (16 MiB in bfloat16).
PADDED_CHUNK_ELEMENTS = 1 << 23
FEW_ROW_KERNELS = ("linear", "vecdot")
# Offsets in elements off a 64-byte boundary at which `_alignment_invariant` places a copy of the weights (in
# float32 4, 8, 12, 16, 32 and 64 bytes, in bfloat16 half that: every power-of-two alignment class a vector
# kernel's peeling can depend on) and of the input rows.
_WEIGHT_OFFSETS = (1, 2, 3, 4, 8, 16)
_INPUT_OFFSETS = (1, 3)
# The check runs on at most this many weight rows: a row's dot product runs over D whatever O is, and the copies
# stay small for large experts.
_PROBE_ROWS = 512


def vecdot_linear(x_nD: torch.Tensor, w_OD: torch.Tensor) -> torch.Tensor:
    """`F.linear(x_nD, w_OD)` as one vecdot per input row: (O, D) . (1, 1, D) -> (1, O), rows one at a time
    (no (n, O, D) product is allocated). Bitwise independent of the operands' alignment and of n."""
    rows = [torch.linalg.vecdot(w_OD, x_nD[r : r + 1].unsqueeze(1)) for r in range(x_nD.shape[0])]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _linear_no_bias(x_nD: torch.Tensor, w_OD: torch.Tensor) -> torch.Tensor:
    return F.linear(x_nD, w_OD)


_KERNELS = {"linear": _linear_no_bias, "vecdot": vecdot_linear}


@functools.cache
def cpu_vendor() -> str:
    """The CPU vendor string ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo, else `platform`'s."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (e.g. "avx512_bf16", "amx_bf16"); empty where it is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class PaddedPlan:
    """How `experts.PaddedExperts` runs the grouped experts: the groups zero-padded to P = max(counts) rows and
    each projection as batched GEMMs over `experts_per_call` experts at a time.

    orientation  "xw": x_EPD @ W^T -> (E, P, O), the weights transposed; "wx": W @ x_EPD^T -> (E, O, P), the
                 weights as stored: bfloat16 on AMX with a few rows per expert, where oneDNN then reads the weights
                 at about the rate of one sum over them (1.6x faster than "xw"), and float32 on MKL with 7 to
                 `FEW_ROWS_MAX_P` rows. With hundreds of rows "wx" leaves the SwiGLU and the backward on
                 transposed activations, which costs more than it gains. The backward always multiplies by the
                 weights as stored (dy @ W), the faster form in both dtypes.
    experts_per_call  experts per `torch.bmm`: the (c, P, 2I) intermediate stays within `PADDED_CHUNK_ELEMENTS`
                 (16 MiB in bfloat16), where one call over all E experts would page-fault and spill the cache.
    """

    orientation: str
    experts_per_call: int


def padded_plan(x_TD: torch.Tensor, counts: list[int], intermediate: int) -> PaddedPlan | None:
    """How the grouped experts' GEMMs run on this CPU for these routing counts: a `PaddedPlan` (batched GEMMs
    over the zero-padded groups) or None (one GEMM pair per expert, `experts.GroupedExperts`).

    "auto" (the default of `MOE_CPU_GROUPED_KERNEL`), a rule of the CPU kind, the dtype and the counts, never a
    timing (measurements: bench/RESULTS.md, Intel Xeon with AMX):
      - few rows per expert (P <= `FEW_ROWS_MAX_P`, decoding batches): moving the weights is the cost, and one
        batched call reads them at about the rate of a sum over them, where a GEMM pair per expert pays a call
        and a thread fork-join per expert. Taken when the routing hits at least half of the experts (the batched
        call reads every expert) with bfloat16 on AMX ("wx") or float32 on a CPU whose few-row kernel is MKL's
        (`preference_order`; "xw" up to `FP32_XW_MAX_P` rows, "wx" above);
      - more rows: bfloat16 on AMX, while padding adds at most `PADDED_BMM_MAX_ROWS_RATIO - 1` of the rows
        ("xw"): oneDNN's batched GEMM over a few experts at a time runs faster than per-expert GEMMs of a few
        hundred rows. float32 keeps the loop (with hundreds of rows the batched GEMM is no faster).
    A batched form is used only where its bits do not depend on where the weights and rows sit in memory
    (`_alignment_invariant`, as for the few-row kernel), so a checkpoint reloaded from safetensors gives the
    same logits. "bmm" (any dtype; "wx" for bfloat16 with few rows, else "xw") or "loop" pins it."""
    value = os.environ.get(GROUPED_KERNEL_ENV, "auto").strip().lower()
    if value not in ("auto", *GROUPED_KERNELS):
        raise ValueError(f"{GROUPED_KERNEL_ENV}={value!r}: expected 'auto' or one of {GROUPED_KERNELS}")
    if x_TD.device.type != "cpu" or value == "loop" or not counts or not any(counts):
        return None
    E, P, D = len(counts), max(counts), x_TD.shape[-1]
    chunk = max(1, min(E, PADDED_CHUNK_ELEMENTS // (P * 2 * intermediate)))
    few_rows = P <= FEW_ROWS_MAX_P
    if value == "bmm":
        return PaddedPlan("wx" if few_rows and x_TD.dtype == torch.bfloat16 else "xw", chunk)
    amx_bf16 = x_TD.dtype == torch.bfloat16 and "amx_bf16" in cpu_flags()
    mkl_fp32 = x_TD.dtype == torch.float32 and preference_order(cpu_vendor())[0] == "linear"
    if few_rows:
        if 2 * sum(n > 0 for n in counts) < E:  # a call over every expert would read over twice the bytes
            return None
        orientation = "wx" if amx_bf16 else ("xw" if P <= FP32_XW_MAX_P else "wx") if mkl_fp32 else None
    else:
        orientation = "xw" if amx_bf16 and E * P <= PADDED_BMM_MAX_ROWS_RATIO * sum(counts) else None
    if orientation is None:
        return None
    for O, X in ((2 * intermediate, D), (D, intermediate)):  # gate/up, then down
        if not _bmm_eligible(orientation, x_TD.dtype, P, O, X):
            return None
    return PaddedPlan(orientation, chunk)


def padded_matmul(x_cPX: torch.Tensor, w_cOX: torch.Tensor, bias_cO: torch.Tensor | None, orientation: str, out=None):
    """x @ w^T (+ bias) over a batch of experts, (c, P, O) in the plan's orientation's memory layout: "xw" gives a
    contiguous (c, P, O), "wx" the transpose of a contiguous (c, O, P). `out` (optional) is that contiguous
    buffer: (c, P, O) for "xw", (c, O, P) for "wx"."""
    if orientation == "xw":
        w_cXO = w_cOX.transpose(1, 2)
        if bias_cO is None:
            return torch.bmm(x_cPX, w_cXO, out=out)
        return torch.baddbmm(bias_cO.unsqueeze(1), x_cPX, w_cXO, out=out)
    x_cXP = x_cPX.transpose(1, 2)
    if bias_cO is None:
        y_cOP = torch.bmm(w_cOX, x_cXP, out=out)
    else:
        y_cOP = torch.baddbmm(bias_cO.unsqueeze(2), w_cOX, x_cXP, out=out)
    return y_cOP.transpose(1, 2)


def _bmm_eligible(orientation: str, dtype: torch.dtype, P: int, O: int, D: int) -> bool:
    """Whether the batched form gives alignment-independent bits for P rows times (O, D) weights, with this
    process's thread count (the kernel a GEMM library picks can depend on it); checked once, cached."""
    return _bmm_eligible_cached(orientation, dtype, P, O, D, torch.get_num_threads())


@functools.cache
def _bmm_eligible_cached(orientation: str, dtype: torch.dtype, P: int, O: int, D: int, threads: int) -> bool:
    return _alignment_invariant(
        lambda x_nD, w_OD: padded_matmul(x_nD.unsqueeze(0), w_OD.unsqueeze(0), None, orientation)[0], P, O, D, dtype
    )


def preference_order(vendor: str) -> tuple[str, ...]:
    """Few-row kernels in order of preference on a CPU of this vendor (measurements: module docstring)."""
    return ("linear", "vecdot") if vendor == "GenuineIntel" else ("vecdot", "linear")


def _shifted(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of `t` starting `offset` elements past a 64-byte aligned allocation."""
    return torch.empty(t.numel() + offset, dtype=t.dtype)[offset:].view_as(t).copy_(t)


def _alignment_invariant(kernel, n: int, O: int, D: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `kernel` (a name of `_KERNELS`, or a callable (x_nD, w_OD) -> (n, O)) gives the same bits for
    (n, D) rows times (O, D) weights wherever either operand sits in memory: random operands, each placed at
    several offsets off a cache line, compared bitwise (on the first `_PROBE_ROWS` weight rows)."""
    fn = _KERNELS[kernel] if isinstance(kernel, str) else kernel
    generator = torch.Generator().manual_seed(0)
    w_OD = torch.randn(min(O, _PROBE_ROWS), D, generator=generator).to(dtype)
    x_nD = torch.randn(n, D, generator=generator).to(dtype)
    reference = fn(x_nD, w_OD)
    shifted = [(x_nD, _shifted(w_OD, off)) for off in _WEIGHT_OFFSETS] + [
        (_shifted(x_nD, off), w_OD) for off in _INPUT_OFFSETS
    ]
    with torch.no_grad():
        return all(torch.equal(fn(x, w), reference) for x, w in shifted)


def _pinned_kernel() -> str | None:
    value = os.environ.get(KERNEL_ENV, "auto").strip().lower()
    if value == "auto":
        return None
    if value not in FEW_ROW_KERNELS:
        raise ValueError(f"{KERNEL_ENV}={value!r}: expected 'auto' or one of {FEW_ROW_KERNELS}")
    return value


@functools.cache
def _chosen_kernel(n: int, O: int, D: int, threads: int, pinned: str | None) -> str:
    if pinned is not None:
        return pinned
    order = preference_order(cpu_vendor())
    with torch.no_grad():
        return next((k for k in order if k == "vecdot" or _alignment_invariant(k, n, O, D)), "vecdot")


def few_row_kernel(n: int, O: int, D: int) -> str:
    """The kernel `few_row_linear` uses for n float32 rows times (O, D) weights in this process (see the module
    docstring); decided once per shape and thread count, and cached."""
    return _chosen_kernel(n, O, D, torch.get_num_threads(), _pinned_kernel())


def few_row_linear(x_nD: torch.Tensor, w_OD: torch.Tensor, b_O: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x_nD, w_OD, b_O)` for a few float32 rows on the CPU, (n, O), with this CPU's kernel."""
    n, D = x_nD.shape
    y_nO = _KERNELS[few_row_kernel(n, w_OD.shape[0], D)](x_nD, w_OD)  # the kernel that was checked, then the bias
    return y_nO.add_(b_O) if b_O is not None else y_nO


__all__ = [
    "FEW_ROW_KERNELS",
    "GROUPED_KERNELS",
    "GROUPED_KERNEL_ENV",
    "KERNEL_ENV",
    "PaddedPlan",
    "cpu_flags",
    "few_row_kernel",
    "few_row_linear",
    "padded_matmul",
    "padded_plan",
    "vecdot_linear",
]
