"""The CPU few-row kernel choice (`modeling_moe.cpu_kernels`): every kernel computes `F.linear`, the choice is
deterministic, eligible only when alignment-independent, and can be pinned."""

import pytest
import torch
import torch.nn.functional as F

from modeling_moe import cpu_kernels
from modeling_moe.cpu_kernels import KERNEL_ENV, few_row_kernel, few_row_linear


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
