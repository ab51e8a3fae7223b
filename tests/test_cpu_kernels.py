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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_padded_bmm_grouped_path_matches_the_loop_path(monkeypatch, dtype, bias):
    """The grouped experts' padded batched GEMM ("bmm") computes what the per-expert loop ("loop") does, outputs
    and gradients, with a dropped assignment and an expert no token picked."""
    from modeling_moe.experts import grouped_experts_forward

    E, D, I, T, K = 4, 16, 12, 10, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, D, generator=g) * D**-0.5).to(dtype).requires_grad_()
    down = (torch.randn(E, D, I, generator=g) * I**-0.5).to(dtype).requires_grad_()
    b1 = torch.randn(E, 2 * I, generator=g).to(dtype).requires_grad_() if bias else None
    b2 = torch.randn(E, D, generator=g).to(dtype).requires_grad_() if bias else None
    indices = torch.randint(0, E - 1, (T, K), generator=g)  # expert E-1 is never picked
    indices[0, 1] = E  # dropped
    weights = torch.rand(T, K, generator=g, requires_grad=True)
    params = [t for t in (x, gate_up, down, weights, b1, b2) if t is not None]
    grad = torch.randn(T, D, generator=g).to(dtype)
    results = {}
    for kernel in ("loop", "bmm"):
        monkeypatch.setenv(GROUPED_KERNEL_ENV, kernel)
        y = grouped_experts_forward(x, gate_up, down, indices, weights, F.silu, b1, b2)
        results[kernel] = (y, *torch.autograd.grad(y, params, grad))
        with torch.no_grad():  # without grad mode: SwiGLU in place, nothing saved
            torch.testing.assert_close(grouped_experts_forward(x, gate_up, down, indices, weights, F.silu, b1, b2), y)
    for got, expected in zip(results["bmm"], results["loop"]):
        torch.testing.assert_close(
            got, expected, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-4 if dtype == torch.float32 else 2e-2
        )


def test_padded_bmm_rule(monkeypatch):
    from modeling_moe.cpu_kernels import PADDED_BMM_MAX_ROWS_RATIO, cpu_flags, use_padded_bmm

    x16, x32 = torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(2, 4)
    monkeypatch.setenv(GROUPED_KERNEL_ENV, "auto")
    assert use_padded_bmm(x16, [10, 10, 10, 10]) == ("amx_bf16" in cpu_flags())
    assert not use_padded_bmm(x32, [10, 10, 10, 10])
    assert not use_padded_bmm(x16, [40, 1, 1, 1])  # padding would compute 4 * 40 rows for 43
    assert 4 * 40 > PADDED_BMM_MAX_ROWS_RATIO * 43
    monkeypatch.setenv(GROUPED_KERNEL_ENV, "bmm")
    assert use_padded_bmm(x32, [40, 1, 1, 1])
    monkeypatch.setenv(GROUPED_KERNEL_ENV, "gemm")
    with pytest.raises(ValueError, match=GROUPED_KERNEL_ENV):
        use_padded_bmm(x16, [1])
