"""The CPU few-row kernel choice (`modeling_moe.cpu_kernels`): every kernel computes `F.linear`, the choice is
deterministic, eligible only when alignment-independent, and can be pinned."""

import pytest
import torch
import torch.nn.functional as F

from modeling_moe import cpu_kernels
from modeling_moe.cpu_kernels import GROUPED_KERNEL_ENV, KERNEL_ENV, few_row_kernel, few_row_linear


def _shifted(t, offset):
    return torch.empty(t.numel() + offset)[offset:].view_as(t).copy_(t)


@pytest.mark.parametrize("pin", ["auto", "linear", "vecdot"])
@pytest.mark.parametrize("rows", [1, 3])
def test_few_row_linear_matches_f_linear_under_every_kernel(monkeypatch, pin, rows):
    monkeypatch.setenv(KERNEL_ENV, pin)
    w, b = torch.randn(40, 24), torch.randn(40)
    x = torch.randn(24, rows).t()  # (rows, 24), column-major
    torch.testing.assert_close(few_row_linear(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(few_row_linear(x, w), F.linear(x, w))
    if pin != "auto":
        assert few_row_kernel(rows, 40, 24) == pin


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_auto_choice_is_alignment_independent_and_follows_the_preference_order(monkeypatch, rows):
    """The "auto" choice takes the first kernel of this CPU kind's order whose bits pass the alignment check; the chosen
    kernel's bits do not move when the weights or the rows sit off a cache line (what save/load parity needs)."""
    monkeypatch.setenv(KERNEL_ENV, "auto")
    O, D = 96, 40
    order = cpu_kernels.preference_order(cpu_kernels.cpu_vendor())
    expected = next(k for k in order if k == "vecdot" or cpu_kernels._alignment_invariant(k, rows, O, D))
    assert few_row_kernel(rows, O, D) == expected
    assert cpu_kernels._alignment_invariant("vecdot", rows, O, D)
    w, x = torch.randn(O, D), torch.randn(rows, D)
    reference = few_row_linear(x, w)
    for offset in (1, 3, 5):
        assert torch.equal(few_row_linear(x, _shifted(w, offset)), reference)
        assert torch.equal(few_row_linear(_shifted(x, offset), w), reference)


def test_preference_order_per_cpu_kind():
    assert cpu_kernels.preference_order("GenuineIntel") == ("linear", "vecdot")
    assert cpu_kernels.preference_order("AuthenticAMD") == ("vecdot", "linear")


def test_a_bad_pin_names_the_variable(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "mkl")
    with pytest.raises(ValueError, match=KERNEL_ENV):
        few_row_kernel(1, 8, 8)


def _experts_case(dtype, bias, E=4, D=16, I=12, T=10, K=2, seed=0):
    """Random experts and a routing with a dropped assignment and an expert no token picked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, D, generator=g) * D**-0.5).to(dtype).requires_grad_()
    down = (torch.randn(E, D, I, generator=g) * I**-0.5).to(dtype).requires_grad_()
    b1 = torch.randn(E, 2 * I, generator=g).to(dtype).requires_grad_() if bias else None
    b2 = torch.randn(E, D, generator=g).to(dtype).requires_grad_() if bias else None
    indices = torch.randint(0, E - 1, (T, K), generator=g)  # expert E-1 is never picked
    indices[0, 1] = E  # dropped
    weights = torch.rand(T, K, generator=g, requires_grad=True)
    grad = torch.randn(T, D, generator=g).to(dtype)
    return x, gate_up, down, b1, b2, indices, weights, grad


def _routing(indices, E, T):
    """The expert-sorted order (a tensor), counts and padded layout of `indices`, as grouped_experts_forward
    builds them."""
    from modeling_moe.experts import _expert_order, _order_tensor, _padded_layout

    order, counts = _expert_order(indices, E)
    layout = _padded_layout(order, counts, indices.shape[1], T, max(counts), indices.device)
    return _order_tensor(order, indices.device), counts, layout


def _close(got, expected, dtype):
    fp32 = dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5 if fp32 else 2e-2, rtol=1e-4 if fp32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("orientation", ["xw", "wx", "wx-aligned-rows"])
@pytest.mark.parametrize("experts_per_call", [1, 3, 4])
def test_padded_experts_match_the_loop(dtype, bias, orientation, experts_per_call):
    """`PaddedExperts` (batched GEMMs over zero-padded groups) computes what `GroupedExperts` (one GEMM pair per
    expert) does, outputs and every gradient, in both layouts and with the experts split over several calls."""
    from modeling_moe.cpu_kernels import PaddedPlan
    from modeling_moe.experts import GroupedExperts, PaddedExperts, _padded_forward

    x, gate_up, down, b1, b2, indices, weights, grad = _experts_case(dtype, bias)
    T, K, E = x.shape[0], indices.shape[1], gate_up.shape[0]
    order, counts, layout = _routing(indices, E, T)
    params = [t for t in (x, gate_up, down, weights, b1, b2) if t is not None]
    orientation, _, variant = orientation.partition("-")
    plan = PaddedPlan(orientation, experts_per_call, aligned_weights=bool(variant), rows_down_input=bool(variant))
    expected = GroupedExperts.apply(x, gate_up, down, b1, b2, weights, order, counts, K, True)
    got = PaddedExperts.apply(x, gate_up, down, b1, b2, weights, order, layout, K, True, plan)
    _close(got, expected, dtype)
    for g_got, g_expected in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(expected, params, grad)):
        _close(g_got, g_expected, dtype)
    with torch.no_grad():  # without a backward nothing is saved; run without the Function: the same bits
        assert torch.equal(PaddedExperts.apply(x, gate_up, down, b1, b2, weights, order, layout, K, False, plan), got)
        assert torch.equal(_padded_forward(x, gate_up, down, b1, b2, weights, layout, plan, None), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_experts_padding_leaks_nothing_from_a_non_finite_token(dtype):
    """Padding rows are zeros, not copies of a token: a token of infinities (routed to one expert only) gives
    non-finite values in its own rows and its expert's weight gradients, and nowhere else."""
    from modeling_moe.cpu_kernels import PaddedPlan
    from modeling_moe.experts import PaddedExperts

    x, gate_up, down, _, _, _, weights, grad = _experts_case(dtype, False)
    T, K, E = x.shape[0], 2, gate_up.shape[0]
    indices = torch.tensor([[0, 1]] + [[1 + t % 2, 1 + (t + 1) % 2] for t in range(1, T)])  # token 0: experts 0, 1
    indices[0, 1] = E  # token 0 only reaches expert 0
    x = x.detach().clone()
    x[0] = float("inf")
    x.requires_grad_()
    order, _, layout = _routing(indices, E, T)
    y = PaddedExperts.apply(x, gate_up, down, None, None, weights, order, layout, K, True, PaddedPlan("xw", 1))
    dx, dw1, dw2 = torch.autograd.grad(y, (x, gate_up, down), grad)
    assert torch.isfinite(y[1:]).all() and torch.isfinite(dx[1:]).all()
    assert torch.isfinite(dw1[1:]).all() and torch.isfinite(dw2[1:]).all()  # experts 1.. never saw token 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_padded_bmm_grouped_path_matches_the_loop_path(monkeypatch, dtype, bias):
    """Through `grouped_experts_forward`: the pinned padded path ("bmm") computes what the per-expert loop
    ("loop") does, outputs and gradients."""
    from modeling_moe.experts import grouped_experts_forward

    x, gate_up, down, b1, b2, indices, weights, grad = _experts_case(dtype, bias)
    params = [t for t in (x, gate_up, down, weights, b1, b2) if t is not None]
    results = {}
    for kernel in ("loop", "bmm"):
        monkeypatch.setenv(GROUPED_KERNEL_ENV, kernel)
        y = grouped_experts_forward(x, gate_up, down, indices, weights, F.silu, b1, b2)
        results[kernel] = (y, *torch.autograd.grad(y, params, grad))
        with torch.no_grad():
            torch.testing.assert_close(grouped_experts_forward(x, gate_up, down, indices, weights, F.silu, b1, b2), y)
    for got, expected in zip(results["bmm"], results["loop"]):
        _close(got, expected, dtype)


def test_padded_plan_rule(monkeypatch):
    from modeling_moe.cpu_kernels import (
        FEW_ROWS_MAX_P,
        FP32_XW_MAX_P,
        PADDED_BMM_MAX_ROWS_RATIO,
        PADDED_CHUNK_ELEMENTS,
        PaddedPlan,
        _bmm_eligible,
        bf16_few_rows_orientation,
        cpu_flags,
        cpu_vendor,
        padded_plan,
        preference_order,
    )

    x16, x32 = torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(2, 64)
    amx = "amx_bf16" in cpu_flags()
    mkl = preference_order(cpu_vendor())[0] == "linear"
    monkeypatch.setenv(GROUPED_KERNEL_ENV, "auto")
    many = [FEW_ROWS_MAX_P + 4] * 4
    assert (padded_plan(x16, many, 8) is not None) == amx
    assert padded_plan(x32, many, 8) is None  # float32 keeps the loop on many rows
    assert padded_plan(x32, [FEW_ROWS_MAX_P, 0, 0, 0], 8) is None  # one expert of four: the loop
    skewed = [FEW_ROWS_MAX_P + 40, 1, 1, 1]  # many rows: padding would compute 4 * 104 rows for 107
    assert padded_plan(x16, skewed, 8) is None
    assert 4 * max(skewed) > PADDED_BMM_MAX_ROWS_RATIO * sum(skewed)
    few = [3, 1, 0, 2]  # few rows, 3 of 4 experts hit
    few_bf16 = bf16_few_rows_orientation(cpu_flags())
    assert (padded_plan(x16, few, 8) or PaddedPlan(None, 4)) == PaddedPlan(few_bf16, 4)
    amd = cpu_vendor() == "AuthenticAMD"
    if mkl or not amd:
        assert (padded_plan(x32, few, 8) is not None) == mkl
    else:  # float32 on an AMD EPYC: W @ x^T on aligned operands, where its bits hold at every aligned placement
        eligible = all(_bmm_eligible("wx", torch.float32, 3, O, X, True) for O, X in ((16, 64), (64, 8)))
        expected = PaddedPlan("wx", 4, aligned_weights=True, rows_down_input=True) if eligible else None
        assert padded_plan(x32, few, 8) == expected
        assert padded_plan(x32, [cpu_kernels.AMD_FP32_WX_MAX_P + 1, 1, 1, 1], 8) is None  # more rows: the loop
    assert padded_plan(x32, [3, 0, 0, 0], 8) is None  # the batched call would read 4 experts for 1
    if mkl:  # float32: x @ W^T up to FP32_XW_MAX_P rows, W @ x^T above (where its bits pass the alignment check)
        for counts, orientation in (
            ([FP32_XW_MAX_P, 1, 1, 1], "xw"),
            ([FP32_XW_MAX_P + 1, 1, 1, 1], "wx"),
            ([FEW_ROWS_MAX_P, 1, 1, 1], "wx"),  # batched up to FEW_ROWS_MAX_P rows, whatever the padding
        ):
            P = max(counts)
            eligible = all(_bmm_eligible(orientation, torch.float32, P, O, X) for O, X in ((16, 64), (64, 8)))
            assert padded_plan(x32, counts, 8) == (PaddedPlan(orientation, 4) if eligible else None)
    if amx:
        assert padded_plan(x16, few, 8).orientation == "wx"
        plan = padded_plan(x16, many, 8)
        assert plan.orientation == "xw"
        assert plan.experts_per_call == max(1, min(4, PADDED_CHUNK_ELEMENTS // (many[0] * 16)))
        assert padded_plan(x16, [8192] * 4, 512).experts_per_call == 1
    monkeypatch.setenv(GROUPED_KERNEL_ENV, "bmm")
    assert padded_plan(x32, [40, 1, 1, 1], 8) == PaddedPlan("xw", 4)
    assert padded_plan(x16, skewed, 8).orientation == "xw"
    assert padded_plan(x16, [40, 1, 1, 1], 8).orientation == "wx"  # few rows
    assert padded_plan(x16, few, 8).orientation == "wx"
    monkeypatch.setenv(GROUPED_KERNEL_ENV, "loop")
    assert padded_plan(x16, few, 8) is None
    monkeypatch.setenv(GROUPED_KERNEL_ENV, "gemm")
    with pytest.raises(ValueError, match=GROUPED_KERNEL_ENV):
        padded_plan(x16, [1], 8)


def test_bf16_few_rows_orientation_per_cpu_kind():
    """bfloat16 with few rows per expert: "wx" on AMX, "xw" with avx512_bf16 alone, the loop elsewhere (measured:
    bench/RESULTS.md); AMX decides where a CPU has both."""
    from modeling_moe.cpu_kernels import bf16_few_rows_orientation

    assert bf16_few_rows_orientation(frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})) == "wx"
    assert bf16_few_rows_orientation(frozenset({"avx512f", "avx512_bf16"})) == "xw"
    assert bf16_few_rows_orientation(frozenset({"avx2", "fma"})) is None
    assert bf16_few_rows_orientation(frozenset()) is None


@pytest.mark.parametrize(
    "orientation,dtype,rows",
    [("xw", torch.float32, 3), ("wx", torch.float32, 12), ("wx", torch.bfloat16, 3), ("xw", torch.bfloat16, 3)],
)
def test_padded_matmul_bits_do_not_depend_on_alignment_where_it_is_used(orientation, dtype, rows):
    """Where the auto rule takes a batched form on this CPU, its bits do not move with the operands' memory
    offsets (what save/load parity needs); elsewhere the rule must not take it."""
    from modeling_moe.cpu_kernels import _bmm_eligible, padded_matmul

    eligible = _bmm_eligible(orientation, dtype, rows, 96, 40)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 96, 40, generator=g).to(dtype)
    x = torch.randn(2, rows, 40, generator=g).to(dtype)
    reference = padded_matmul(x, w, None, orientation)
    torch.testing.assert_close(reference, torch.stack([F.linear(x[i], w[i]) for i in range(2)]))
    shifted = [
        torch.equal(
            padded_matmul(x, torch.empty(w.numel() + o, dtype=dtype)[o:].view_as(w).copy_(w), None, orientation),
            reference,
        )
        for o in (1, 3, 8)
    ]
    assert all(shifted) or not eligible


def test_padded_layout_host_and_tensor_paths_agree(monkeypatch):
    """The expert order and the padded layout are the same from host ints (decode-sized) and from tensor ops."""
    from modeling_moe import experts

    g = torch.Generator().manual_seed(2)
    T, K, E = 40, 3, 5
    indices = torch.randint(0, E + 1, (T, K), generator=g)  # E: dropped
    flat = indices.reshape(-1)
    order, counts = experts._expert_order(indices, E)
    assert isinstance(order, list)
    P = max(counts)
    host = experts._padded_layout(order, counts, K, T, P, indices.device)
    monkeypatch.setattr(experts, "_HOST_LAYOUT_MAX", 0)
    order_N, counts_tensor_path = experts._expert_order(indices, E)
    assert isinstance(order_N, torch.Tensor) and order_N.tolist() == order and counts_tensor_path == counts
    assert order_N.tolist() == torch.argsort(flat, stable=True)[: sum(counts)].tolist()
    tensor = experts._padded_layout(order_N, counts, K, T, P, indices.device)
    for a, b in zip(host, tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype == torch.long
    assert torch.equal(host.slot_TK.reshape(-1)[order_N], host.slot_N)
    assert torch.equal(host.slot_TK == E * P, indices == E)  # dropped choices point past the padded rows
    assert torch.equal(host.slot_N // P, flat[order_N])  # each assignment in its expert's rows
    assert torch.equal(host.token_N, order_N // K)
    padding = torch.ones(E * P, dtype=torch.bool).index_fill_(0, host.slot_N, False)
    assert torch.equal(host.rows_R[host.slot_N], host.token_N) and (host.rows_R[padding] == T).all()


def test_expert_order_refuses_negative_indices():
    from modeling_moe import experts

    with pytest.raises(ValueError, match="indices_TK"):
        experts._expert_order(torch.tensor([[0, -1]]), 4)


@pytest.mark.parametrize("rows", [1, 2, 3])
# the default buffer; ragged blocks of 7 weight rows (the last of 5); one block of all 40
@pytest.mark.parametrize("scratch", [None, 7 * 24, 40 * 24])
def test_vecdot_kernel_gives_vecdots_bits_for_every_block_size(monkeypatch, rows, scratch):
    """The vecdot kernel sums blocks of weight rows through a scratch buffer; every output is still one ATen sum over
    all of D, so its bits are `torch.linalg.vecdot`'s (row by row and all rows at once) whatever the block size."""
    if scratch is not None:
        monkeypatch.setattr(cpu_kernels, "VECDOT_SCRATCH_ELEMENTS", scratch * rows)
    w, x = torch.randn(40, 24), torch.randn(rows, 24)
    y = cpu_kernels.vecdot_linear(x, w)
    assert y.shape == (rows, 40)
    assert torch.equal(y, torch.linalg.vecdot(w, x.unsqueeze(1)))
    assert torch.equal(y, torch.cat([torch.linalg.vecdot(w, x[r : r + 1].unsqueeze(1)) for r in range(rows)]))
    torch.testing.assert_close(y, F.linear(x, w))


def test_vecdot_kernel_is_differentiable_and_thread_safe():
    w = torch.randn(40, 24, requires_grad=True)
    x = torch.randn(2, 24)
    y = cpu_kernels.vecdot_linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(40, 24))
    # each thread multiplies into its own scratch buffer: concurrent calls give each caller its own result
    from concurrent.futures import ThreadPoolExecutor

    cases = [(torch.randn(3, 24), torch.randn(40 + i, 24)) for i in range(8)]
    with torch.no_grad(), ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: cpu_kernels.vecdot_linear(*c), cases * 4))
    for (xi, wi), yi in zip(cases * 4, results):
        assert torch.equal(yi, torch.linalg.vecdot(wi, xi.unsqueeze(1)))


def test_the_aligned_check_tells_alignment_dependence_from_aligned_placements():
    """A kernel whose bits depend on where its weights sit off a cache line (as MKL's float32 kernels do on an AMD
    EPYC) fails the full check and passes the aligned one; one whose bits change from call to call fails both."""
    from modeling_moe.cpu_kernels import CPU_ALIGNMENT, _alignment_invariant

    def off_line(x, w):  # a last-bit difference for weights off a CPU_ALIGNMENT boundary
        y = F.linear(x, w)
        return torch.nextafter(y, torch.full_like(y, float("inf"))) if w.data_ptr() % CPU_ALIGNMENT else y

    calls = []

    def drifting(x, w):  # the reference call gives F.linear's bits, every later call one step above
        y = F.linear(x, w)
        calls.append(1)
        return torch.nextafter(y, torch.full_like(y, float("inf"))) if len(calls) > 1 else y

    assert not _alignment_invariant(off_line, 2, 48, 24) and _alignment_invariant(off_line, 2, 48, 24, aligned=True)
    assert not _alignment_invariant(drifting, 2, 48, 24, aligned=True)
    assert _alignment_invariant("vecdot", 2, 48, 24) and _alignment_invariant("vecdot", 2, 48, 24, aligned=True)


@pytest.mark.parametrize("offset", [1, 3, 8])
def test_a_plan_on_aligned_weights_gives_the_same_bits_for_weights_off_a_cache_line(offset):
    """With `aligned_weights` the forward multiplies a 64-byte aligned copy of weights that sit elsewhere (a tensor
    assigned from a memory-mapped file), so its bits are those of the aligned weights, whatever the kernel does."""
    from modeling_moe.cpu_kernels import PaddedPlan, cpu_aligned
    from modeling_moe.experts import _padded_forward

    x, gate_up, down, b1, b2, indices, weights, _ = _experts_case(torch.float32, True)
    T, E = x.shape[0], gate_up.shape[0]
    _, _, layout = _routing(indices, E, T)
    plan = PaddedPlan("wx", E, aligned_weights=True)
    with torch.no_grad():
        reference = _padded_forward(x, gate_up, down, b1, b2, weights, layout, plan, None)
        shifted = [_shifted(w.detach(), offset) for w in (gate_up, down)]
        assert all(w.data_ptr() % 64 for w in shifted)
        assert torch.equal(_padded_forward(x, *shifted, b1, b2, weights, layout, plan, None), reference)
    assert cpu_aligned(gate_up) is gate_up
    copy = cpu_aligned(shifted[0])
    assert copy.data_ptr() % 64 == 0 and torch.equal(copy, shifted[0])
