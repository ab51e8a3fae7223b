"""Which CPU kernels the experts run, chosen by what this kind of CPU does: the float32 linear on a few rows
(`few_row_linear`) and how the grouped experts' GEMMs run (`padded_plan`: one GEMM pair per expert, or batched
GEMMs over the groups zero-padded to the largest one; see its docstring).

The experts' few-token path multiplies each hit expert's weights by 1-3 rows. Two exact kernels compute
`F.linear(x_nD, w_OD)` there:
    "linear"  `F.linear`: MKL's GEMV / small GEMM.
    "vecdot"  a multiply and an ATen sum over D, a block of weight rows at a time (`vecdot_linear`).
Which one is faster depends on the processor (bench/RESULTS.md, one table per CPU kind): on two 2-core AMD EPYC
machines (avx512_bf16, no AMX) the vecdot kernel streams the weights 1.4-2x faster than MKL's GEMV (MKL runs its
generic code path there); on a 2-core Intel Xeon with AMX, MKL's GEMV is the fast one and vecdot is 3-15x slower.

Bits. A checkpoint loaded from safetensors may hold its weights at any offset, and its logits must equal those
of the model it came from, in a fresh process. So a kernel is only used where its bits do not depend on the
weights' (or the input rows') memory alignment: on the AMD EPYC, MKL's GEMV does depend on it, so "linear" is
not eligible there. Eligibility is checked bitwise, once per process and shape, by `_alignment_invariant`.
A batched GEMM whose bits move only when an operand sits off a `CPU_ALIGNMENT` boundary (MKL's float32 kernels
on the AMD EPYC: the same bits at every aligned address, checked the same way) is used on aligned operands only:
the rows are fresh allocations, `from_pretrained` aligns a loaded model's tensors, and the forward copies any
other weight tensor that sits off the boundary (`PaddedPlan.aligned_weights`).
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
import threading
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
# float32 with few rows on an AMD EPYC: `W @ x^T` up to this many rows per expert, the loop above (decode-sized
# blocks: 0.61x the loop's time with 3 rows, 0.77x with 8, 1.29x with 12, 1.30x with 22; bench/RESULTS.md).
AMD_FP32_WX_MAX_P = 8
# Elements of the (c, P, 2I) intermediate of one batched call over c experts (16 MiB in bfloat16).
PADDED_CHUNK_ELEMENTS = 1 << 23
FEW_ROW_KERNELS = ("linear", "vecdot")
# Elements of the vecdot kernel's per-thread products buffer (4 MiB in float32): a block of weight rows times the
# input rows, small enough to stay in cache between the multiply and the sum.
VECDOT_SCRATCH_ELEMENTS = 1 << 20
_SCRATCH = threading.local()
# Byte alignment of every allocation of torch's CPU allocator, and of every CPU tensor of a model loaded with
# `from_pretrained` (modeling_moe.py gives tensors that a memory-mapped file left off it an aligned copy).
CPU_ALIGNMENT = 64
# Offsets in elements off a 64-byte boundary at which `_alignment_invariant` places a copy of the weights (in
# float32 4, 8, 12, 16, 32 and 64 bytes, in bfloat16 half that: every power-of-two alignment class a vector
# kernel's peeling can depend on) and of the input rows.
_WEIGHT_OFFSETS = (1, 2, 3, 4, 8, 16)
_INPUT_OFFSETS = (1, 3)
# The check runs on at most this many weight rows: a row's dot product runs over D whatever O is, and the copies
# stay small for large experts.
_PROBE_ROWS = 512


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's scratch buffer of at least `numel` elements of `dtype` (kept for the next call)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = _SCRATCH.buf = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def vecdot_linear(x_nD: torch.Tensor, w_OD: torch.Tensor) -> torch.Tensor:
    """`F.linear(x_nD, w_OD)` as a multiply and an ATen sum over D: y[n, o] = sum_d x[n, d] * w[o, d], (n, O).

    The weights are read from memory once, a block of r rows at a time: the (n, r, D) products of a block go into
    this thread's scratch buffer (at most `VECDOT_SCRATCH_ELEMENTS`, so the block stays in cache while each of the
    n rows multiplies it) and are summed straight into the output. It is `torch.linalg.vecdot(w_OD, x_n1D)`
    (a multiply, then a sum) without its (n, O, D) product: allocating that on every call left the allocator
    mapping fresh pages and page-faulting them in some processes (on an AMD EPYC the same call took 4.5 ms in one
    process and 37 ms in another; bench/RESULTS.md). Each output's sum runs over all of D in one ATen reduction,
    so the bits are `torch.linalg.vecdot`'s for every block size and row count (tested), and independent of the
    operands' alignment (ATen's reductions use unaligned vector loads; checked by `_alignment_invariant`)."""
    if torch.is_grad_enabled() and (x_nD.requires_grad or w_OD.requires_grad):  # the same ops, differentiable
        return torch.linalg.vecdot(w_OD, x_nD.unsqueeze(1))
    n, D = x_nD.shape
    O = w_OD.shape[0]
    rows = max(1, min(O, VECDOT_SCRATCH_ELEMENTS // max(1, n * D)))
    products = _scratch(n * rows * D, torch.promote_types(x_nD.dtype, w_OD.dtype))
    y_nO = torch.empty(n, O, dtype=products.dtype)
    x_n1D = x_nD.unsqueeze(1)
    for start in range(0, O, rows):
        r = min(rows, O - start)
        prod_nrD = products[: n * r * D].view(n, r, D)
        torch.mul(w_OD[start : start + r], x_n1D, out=prod_nrD)
        torch.sum(prod_nrD, dim=-1, out=y_nO[:, start : start + r])
    return y_nO


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
    aligned_weights  the batched GEMMs' bits are the same wherever `CPU_ALIGNMENT`-aligned operands sit, but not
                 at every offset (MKL's float32 kernels on an AMD EPYC): the forward then multiplies aligned
                 weights, copying a weight tensor that sits off that boundary for the call (`cpu_aligned`), so that
                 the bits do not depend on where a checkpoint's tensors were loaded. The padded rows and the
                 activations are fresh allocations, always aligned.
    rows_down_input  "wx" only: the down projection multiplies a row-major (c, P, I) copy of the SwiGLU output,
                 which "wx" leaves column-major (c, I, P): MKL's float32 `W @ h^T` on an AMD EPYC runs 2.6x faster
                 with the row-major operand (0.96-1.02 against 2.63-2.65 ms for 8 decode-sized experts, 3 rows),
                 and the copy is P x I elements per expert. Not measured on AMX, where the plan keeps the layout.
    """

    orientation: str
    experts_per_call: int
    aligned_weights: bool = False
    rows_down_input: bool = False


def padded_plan(x_TD: torch.Tensor, counts: list[int], intermediate: int) -> PaddedPlan | None:
    """How the grouped experts' GEMMs run on this CPU for these routing counts: a `PaddedPlan` (batched GEMMs
    over the zero-padded groups) or None (one GEMM pair per expert, `experts.GroupedExperts`).

    "auto" (the default of `MOE_CPU_GROUPED_KERNEL`), a rule of the CPU kind, the dtype and the counts, never a
    timing (measurements: bench/RESULTS.md, one table per CPU kind):
      - few rows per expert (P <= `FEW_ROWS_MAX_P`, decoding batches): moving the weights is the cost, and one
        batched call reads them at about the rate of a sum over them, where a GEMM pair per expert pays a call
        and a thread fork-join per expert. Taken when the routing hits at least half of the experts (the batched
        call reads every expert) with bfloat16 on a CPU with AMX or avx512_bf16 (`bf16_few_rows_orientation`),
        float32 on a CPU whose few-row kernel is MKL's (`preference_order`; "xw" up to `FP32_XW_MAX_P` rows, "wx"
        above) or float32 on an AMD EPYC up to `AMD_FP32_WX_MAX_P` rows ("wx" on aligned weights: MKL's bits
        there depend on the operands' placement off a cache line, not on where aligned operands sit;
        `PaddedPlan.aligned_weights`);
      - more rows: bfloat16 on AMX, while padding adds at most `PADDED_BMM_MAX_ROWS_RATIO - 1` of the rows
        ("xw"): oneDNN's batched GEMM over a few experts at a time runs faster than per-expert GEMMs of a few
        hundred rows. Without AMX (AMD EPYC, avx512_bf16) the same batched GEMM is 1.10-1.53x slower than the
        loop there, and float32 keeps the loop everywhere (with hundreds of rows the batched GEMM is no faster).
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
    bf16 = x_TD.dtype == torch.bfloat16
    amx_bf16 = bf16 and "amx_bf16" in cpu_flags()
    mkl_fp32 = x_TD.dtype == torch.float32 and preference_order(cpu_vendor())[0] == "linear"
    if few_rows:
        if 2 * sum(n > 0 for n in counts) < E:  # a call over every expert would read over twice the bytes
            return None
        if bf16:
            orientation = bf16_few_rows_orientation(cpu_flags())
        elif mkl_fp32:
            orientation = "xw" if P <= FP32_XW_MAX_P else "wx"
        elif x_TD.dtype == torch.float32 and cpu_vendor() == "AuthenticAMD" and P <= AMD_FP32_WX_MAX_P:
            # W @ x^T on aligned operands: MKL's bits there hold at aligned placements only
            return _eligible_plan("wx", x_TD.dtype, P, D, intermediate, chunk, aligned=True, rows_down_input=True)
        else:
            orientation = None
    else:
        orientation = "xw" if amx_bf16 and E * P <= PADDED_BMM_MAX_ROWS_RATIO * sum(counts) else None
    if orientation is None:
        return None
    return _eligible_plan(orientation, x_TD.dtype, P, D, intermediate, chunk)


def _eligible_plan(
    orientation, dtype, P: int, D: int, intermediate: int, chunk: int, aligned=False, rows_down_input=False
):
    """The plan, if both projections' batched GEMMs pass the alignment check (at every offset, or with `aligned`
    at every `CPU_ALIGNMENT`-aligned one), else None."""
    for O, X in ((2 * intermediate, D), (D, intermediate)):  # gate/up, then down
        if not _bmm_eligible(orientation, dtype, P, O, X, aligned):
            return None
    return PaddedPlan(orientation, chunk, aligned, rows_down_input)


def cpu_aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy of it where its data sits off a `CPU_ALIGNMENT`-byte boundary."""
    return t if t.data_ptr() % CPU_ALIGNMENT == 0 else t.clone(memory_format=torch.contiguous_format)


def bf16_few_rows_orientation(flags: frozenset[str]) -> str | None:
    """The batched form for bfloat16 with few rows per expert on a CPU with these flags, or None (the loop).

    Measured (bench/RESULTS.md, one table per CPU kind), one batched call over all experts against one GEMM pair
    per expert, 1-64 rows per expert:
        amx_bf16      "wx" (Intel Xeon with AMX: oneDNN's AMX kernels read the weights as stored at about the rate
                      of a sum over them; "xw" 1.6x slower)
        avx512_bf16   "xw" (AMD EPYC, no AMX: 0.76-0.95x the loop's time on decode-sized and batched-decode
                      blocks; "wx" 1.2x slower than the loop)
        neither       None (not measured: the loop)"""
    if "amx_bf16" in flags:
        return "wx"
    if "avx512_bf16" in flags:
        return "xw"
    return None


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


def _bmm_eligible(orientation: str, dtype: torch.dtype, P: int, O: int, D: int, aligned: bool = False) -> bool:
    """Whether the batched form gives alignment-independent bits for P rows times (O, D) weights (with `aligned`:
    the same bits at every `CPU_ALIGNMENT`-aligned placement), with this process's thread count (the kernel a
    GEMM library picks can depend on it); checked once, cached."""
    return _bmm_eligible_cached(orientation, dtype, P, O, D, torch.get_num_threads(), aligned)


@functools.cache
def _bmm_eligible_cached(orientation, dtype, P: int, O: int, D: int, threads: int, aligned: bool) -> bool:
    def kernel(x_nD, w_OD):
        return padded_matmul(x_nD.unsqueeze(0), w_OD.unsqueeze(0), None, orientation)[0]

    return _alignment_invariant(kernel, P, O, D, dtype, aligned=aligned)


def preference_order(vendor: str) -> tuple[str, ...]:
    """Few-row kernels in order of preference on a CPU of this vendor (measurements: module docstring)."""
    return ("linear", "vecdot") if vendor == "GenuineIntel" else ("vecdot", "linear")


def _shifted(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of `t` starting `offset` elements past a 64-byte aligned allocation."""
    return torch.empty(t.numel() + offset, dtype=t.dtype)[offset:].view_as(t).copy_(t)


def _alignment_invariant(
    kernel, n: int, O: int, D: int, dtype: torch.dtype = torch.float32, aligned: bool = False
) -> bool:
    """Whether `kernel` (a name of `_KERNELS`, or a callable (x_nD, w_OD) -> (n, O)) gives the same bits for
    (n, D) rows times (O, D) weights wherever either operand sits in memory: random operands, each placed at
    several offsets off a cache line, compared bitwise (on the first `_PROBE_ROWS` weight rows). With `aligned`,
    only at offsets of whole `CPU_ALIGNMENT`-byte blocks (1, 2, 3 and 5 of them)."""
    fn = _KERNELS[kernel] if isinstance(kernel, str) else kernel
    generator = torch.Generator().manual_seed(0)
    w_OD = torch.randn(min(O, _PROBE_ROWS), D, generator=generator).to(dtype)
    x_nD = torch.randn(n, D, generator=generator).to(dtype)
    reference = fn(x_nD, w_OD)
    block = CPU_ALIGNMENT // w_OD.element_size()
    weight_offsets = tuple(block * k for k in (1, 2, 3, 5)) if aligned else _WEIGHT_OFFSETS
    input_offsets = (block, 3 * block) if aligned else _INPUT_OFFSETS
    shifted = [(x_nD, _shifted(w_OD, off)) for off in weight_offsets] + [
        (_shifted(x_nD, off), w_OD) for off in input_offsets
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
    "CPU_ALIGNMENT",
    "FEW_ROW_KERNELS",
    "GROUPED_KERNELS",
    "GROUPED_KERNEL_ENV",
    "KERNEL_ENV",
    "PaddedPlan",
    "bf16_few_rows_orientation",
    "cpu_aligned",
    "cpu_flags",
    "few_row_kernel",
    "few_row_linear",
    "padded_matmul",
    "padded_plan",
    "vecdot_linear",
]
