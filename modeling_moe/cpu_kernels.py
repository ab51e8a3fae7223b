"""Which CPU kernel runs a float32 linear on a few rows (`few_row_linear`), chosen by what this CPU does.

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
or "vecdot" (used as asked, without the alignment check).
"""

from __future__ import annotations

import functools
import os
import platform

import torch
import torch.nn.functional as F

KERNEL_ENV = "MOE_CPU_FEW_ROW_KERNEL"
GROUPED_KERNEL_ENV = "MOE_CPU_GROUPED_KERNEL"
GROUPED_KERNELS = ("loop", "bmm")
# The padded batched GEMM computes E * max(counts) rows for N assignments: at most this many times N.
PADDED_BMM_MAX_ROWS_RATIO = 1.25
FEW_ROW_KERNELS = ("linear", "vecdot")
# Offsets in float32 elements off a 64-byte boundary at which `_alignment_invariant` places a copy of the weights
# (4, 8, 12, 16 and 32 bytes: every power-of-two alignment class a vector kernel's peeling can depend on) and of
# the input rows.
_WEIGHT_OFFSETS = (1, 2, 3, 4, 8)
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


def use_padded_bmm(x_TD: torch.Tensor, counts: list[int]) -> bool:
    """Whether the grouped experts' GEMMs run as one padded batched GEMM per projection (`torch.bmm` over
    (E, max(counts), D) zero-padded groups) instead of one GEMM pair per expert.

    "auto" (the default of `MOE_CPU_GROUPED_KERNEL`): bfloat16 on a CPU with AMX (`amx_bf16`), where oneDNN's
    batched GEMM runs the experts at about the dense FFN's rate and per-expert GEMMs of a few hundred rows do not
    (bench/RESULTS.md, Intel Xeon with AMX), and only while padding adds at most `PADDED_BMM_MAX_ROWS_RATIO - 1`
    of the rows. "bmm" or "loop" pins it (bmm: on the CPU, any dtype). A rule of the CPU kind and the counts, never
    a timing; bfloat16 bmm gives the same bits wherever the weights sit in memory (tested)."""
    value = os.environ.get(GROUPED_KERNEL_ENV, "auto").strip().lower()
    if value not in ("auto", *GROUPED_KERNELS):
        raise ValueError(f"{GROUPED_KERNEL_ENV}={value!r}: expected 'auto' or one of {GROUPED_KERNELS}")
    if x_TD.device.type != "cpu" or value == "loop" or not counts:
        return False
    if value == "bmm":
        return True
    n_rows = len(counts) * max(counts)
    return (
        x_TD.dtype == torch.bfloat16 and "amx_bf16" in cpu_flags() and n_rows <= PADDED_BMM_MAX_ROWS_RATIO * sum(counts)
    )


def preference_order(vendor: str) -> tuple[str, ...]:
    """Few-row kernels in order of preference on a CPU of this vendor (measurements: module docstring)."""
    return ("linear", "vecdot") if vendor == "GenuineIntel" else ("vecdot", "linear")


def _shifted(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of `t` starting `offset` elements past a 64-byte aligned allocation."""
    return torch.empty(t.numel() + offset, dtype=t.dtype)[offset:].view_as(t).copy_(t)


def _alignment_invariant(kernel: str, n: int, O: int, D: int) -> bool:
    """Whether `kernel` gives the same bits for (n, D) rows times (O, D) weights wherever either operand sits in
    memory: random operands, each placed at several offsets off a cache line, compared bitwise (on the first
    `_PROBE_ROWS` weight rows)."""
    fn = _KERNELS[kernel]
    generator = torch.Generator().manual_seed(0)
    w_OD = torch.randn(min(O, _PROBE_ROWS), D, generator=generator)
    x_nD = torch.randn(n, D, generator=generator)
    reference = fn(x_nD, w_OD)
    shifted = [(x_nD, _shifted(w_OD, off)) for off in _WEIGHT_OFFSETS] + [
        (_shifted(x_nD, off), w_OD) for off in _INPUT_OFFSETS
    ]
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
    "cpu_flags",
    "few_row_kernel",
    "few_row_linear",
    "use_padded_bmm",
    "vecdot_linear",
]
