"""The grouped expert computation against a plain per-token reference loop (the oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_moe.experts import experts_forward, gathered_experts_forward, grouped_experts_forward


def reference_loop(x, gate_up, down, indices, weights, b1=None, b2=None):
    """One token and one choice at a time: the definition of the MoE layer output (expert biases optional)."""
    out = torch.zeros_like(x)
    num_experts, two_i, _ = gate_up.shape
    i = two_i // 2
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            if e == num_experts:  # dropped
                continue
            h = x[t] @ gate_up[e].T + (b1[e] if b1 is not None else 0)
            y = (F.silu(h[:i]) * h[i:]) @ down[e].T + (b2[e] if b2 is not None else 0)
            out[t] = out[t] + weights[t, k] * y
    return out


@pytest.mark.parametrize(("num_experts", "k", "drop"), [(4, 2, False), (8, 1, False), (6, 3, True), (4, 2, True)])
def test_grouped_matches_reference_loop_forward_and_backward(num_experts, k, drop):
    T, D, I = 19, 16, 24
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    gate_up = torch.randn(num_experts, 2 * I, D, dtype=torch.float64, requires_grad=True)
    down = torch.randn(num_experts, D, I, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(T, num_experts)
    weights, indices = torch.softmax(scores, -1).topk(k, dim=-1)
    weights = weights.double().requires_grad_()
    if drop:
        indices = indices.masked_fill(torch.rand(T, k) < 0.3, num_experts)
    expected = reference_loop(x, gate_up, down, indices, weights)
    got = grouped_experts_forward(x, gate_up, down, indices, weights, F.silu)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, gate_up, down, weights), grad)
    got_grads = torch.autograd.grad(got, (x, gate_up, down, weights), grad)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_unused_experts_and_all_dropped_tokens():
    x = torch.randn(3, 8)
    gate_up, down = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    indices = torch.tensor([[4, 4], [1, 4], [4, 1]])  # expert 1 only; token 0 fully dropped
    weights = torch.rand(3, 2)
    got = grouped_experts_forward(x, gate_up, down, indices, weights, F.silu)
    torch.testing.assert_close(got, reference_loop(x, gate_up, down, indices, weights))
    assert torch.equal(got[0], torch.zeros(8))


def test_bfloat16_output_dtype():
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    gate_up, down = torch.randn(2, 12, 8, dtype=torch.bfloat16), torch.randn(2, 8, 6, dtype=torch.bfloat16)
    indices = torch.tensor([[0], [1], [0], [1], [1]])
    got = grouped_experts_forward(x, gate_up, down, indices, torch.rand(5, 1), F.silu)
    assert got.dtype == torch.bfloat16
    expected = reference_loop(x.float(), gate_up.float(), down.float(), indices, torch.ones(5, 1))
    assert got.shape == expected.shape


@pytest.mark.parametrize("bias", [False, True])
def test_fused_swiglu_backward_passes_gradcheck(bias):
    from modeling_moe.experts import GroupedExperts

    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True) if bias else None
    b2 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True) if bias else None
    counts = [3, 0, 4]  # an expert with no tokens must get an exact zero gradient
    # 7 tokens, K = 2: 14 slots, 7 of them routed (expert 0 takes slots 0, 3, 5; expert 2 takes 1, 8, 10, 13)
    order = torch.tensor([0, 3, 5, 1, 8, 10, 13])
    weights = torch.rand(7, 2, dtype=torch.float64, requires_grad=True)  # the 7 unrouted ones get a zero gradient
    inputs = tuple(t for t in (x, w1, w2, weights, b1, b2) if t is not None)

    def fn(*args):
        a, b, c, w = args[:4]
        d, e = args[4:] if bias else (None, None)
        return GroupedExperts.apply(a, b, c, d, e, w, order, counts, 2, True)

    assert torch.autograd.gradcheck(fn, inputs)
    fn(*inputs).sum().backward()
    assert torch.equal(w1.grad[1], torch.zeros_like(w1.grad[1])) and torch.equal(w2.grad[1], torch.zeros(5, 4).double())
    unrouted = torch.ones(14, dtype=torch.bool).index_fill(0, order, False).view(7, 2)
    assert torch.equal(weights.grad[unrouted], torch.zeros(7).double())
    if bias:
        assert torch.equal(b1.grad[1], torch.zeros(8).double()) and torch.equal(b2.grad[1], torch.zeros(5).double())


def test_expert_biases_match_the_reference_loop_on_both_paths():
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    gate_up, down = torch.randn(3, 12, 8, dtype=torch.float64), torch.randn(3, 8, 6, dtype=torch.float64)
    b1, b2 = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    indices = torch.randint(0, 4, (10, 2))  # 3 = dropped
    weights = torch.rand(10, 2, dtype=torch.float64)
    expected = torch.zeros_like(x)
    for t in range(10):
        for k in range(2):
            e = int(indices[t, k])
            if e < 3:
                h = x[t] @ gate_up[e].T + b1[e]
                expected[t] += weights[t, k] * ((F.silu(h[:6]) * h[6:]) @ down[e].T + b2[e])
    got = grouped_experts_forward(x, gate_up, down, indices, weights, F.silu, b1, b2)  # grouped (grad)
    torch.testing.assert_close(got, expected)
    with torch.no_grad():  # few-token paths
        few = experts_forward(x[:3], gate_up, down, indices[:3], weights[:3], F.silu, b1, b2)
        gathered = gathered_experts_forward(x[:3], gate_up, down, indices[:3], weights[:3], F.silu, b1, b2)
    torch.testing.assert_close(few, expected[:3])
    torch.testing.assert_close(gathered, expected[:3])


def test_other_activations_take_the_autograd_path():
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    gate_up = torch.randn(3, 12, 8, dtype=torch.float64, requires_grad=True)
    down = torch.randn(3, 8, 6, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, 3, (9, 2))
    weights = torch.rand(9, 2, dtype=torch.float64)
    got = grouped_experts_forward(x, gate_up, down, indices, weights, F.gelu)
    i = 6
    expected = torch.zeros_like(x)
    for t in range(9):
        for k in range(2):
            h = x[t] @ gate_up[indices[t, k]].T
            expected[t] += weights[t, k] * ((F.gelu(h[:i]) * h[i:]) @ down[indices[t, k]].T)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert gate_up.grad is not None


def test_bfloat16_gradients_close_to_float32():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    gate_up, down = torch.randn(4, 24, 16) * 0.2, torch.randn(4, 16, 12) * 0.2
    indices = torch.randint(0, 4, (64, 2))
    weights = torch.rand(64, 2)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = [t.detach().to(dtype).requires_grad_() for t in (x, gate_up, down)]
        grouped_experts_forward(*params, indices, weights, F.silu).float().pow(2).sum().backward()
        grads[dtype] = [p.grad.float() for p in params]
    for g16, g32 in zip(grads[torch.bfloat16], grads[torch.float32]):
        torch.testing.assert_close(g16, g32, atol=0.05 * g32.abs().max().item(), rtol=0.05)


def test_transformers_experts_interface_switches_implementations():
    from modeling_moe import MoeForCausalLM
    from tests.conftest import tiny_config

    model = MoeForCausalLM(tiny_config()).eval()
    assert model.config._experts_implementation == "eager"  # ours by default
    ids = torch.randint(3, 128, (2, 9))
    ours = model(ids).logits
    model.set_experts_implementation("batched_mm")
    assert model.config._experts_implementation == "batched_mm"
    torch.testing.assert_close(model(ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_implementations_that_cannot_drop_are_refused_with_capacity():
    from modeling_moe import MoeForCausalLM
    from tests.conftest import tiny_config

    model = MoeForCausalLM(tiny_config(capacity_factor_train=1.0))
    with pytest.raises(ValueError, match="experts_implementation"):
        model.set_experts_implementation("batched_mm")


def test_few_token_inference_path_matches_the_grouped_path():
    from modeling_moe import experts as ex

    x = torch.randn(3, 8, dtype=torch.float64)
    gate_up, down = torch.randn(4, 12, 8, dtype=torch.float64), torch.randn(4, 8, 6, dtype=torch.float64)
    indices = torch.tensor([[1, 3], [4, 0], [2, 1]])  # token 1 has a dropped assignment (4)
    weights = torch.rand(3, 2, dtype=torch.float64)
    with torch.no_grad():
        few = ex.few_token_experts_forward(x, gate_up, down, indices, weights, F.silu)
        assert indices.numel() <= ex.SMALL_BATCH_ASSIGNMENTS  # what experts_forward dispatches on
        dispatched = ex.experts_forward(x, gate_up, down, indices, weights, F.silu)
        routed = ex.grouped_experts_forward(x, gate_up, down, indices, weights, F.silu)
        gathered = ex.gathered_experts_forward(x, gate_up, down, indices, weights, F.silu)
    torch.testing.assert_close(few, reference_loop(x, gate_up, down, indices, weights))
    for other in (dispatched, routed, gathered):
        torch.testing.assert_close(other, few)
    # with gradients the grouped autograd path is used, and agrees
    x.requires_grad_()
    torch.testing.assert_close(ex.experts_forward(x, gate_up, down, indices, weights, F.silu), few)


@pytest.mark.parametrize("bias", [False, True])
def test_few_token_custom_op_matches_the_loop_and_passes_opcheck(bias):
    """The opaque op that `torch.compile` sees in decode steps: same values as the reference loop, and a fake
    (meta) implementation whose shapes, dtypes and schema torch.library's opcheck accepts."""
    from modeling_moe.experts import few_token_experts_forward

    E, D, I = 4, 8, 6
    x = torch.randn(3, D)
    gate_up, down = torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    b1, b2 = (torch.randn(E, 2 * I), torch.randn(E, D)) if bias else (None, None)
    indices = torch.tensor([[1, 3], [E, 0], [2, E]])  # two dropped assignments
    weights = torch.rand(3, 2)
    got = torch.ops.moe_lm.few_token_swiglu(x, gate_up, down, indices, weights, b1, b2)
    expected = few_token_experts_forward(x, gate_up, down, indices, weights, F.silu, b1, b2)
    torch.testing.assert_close(got, expected)
    if not bias:
        torch.testing.assert_close(got, reference_loop(x, gate_up, down, indices, weights))
    torch.library.opcheck(
        torch.ops.moe_lm.few_token_swiglu.default,
        (x, gate_up, down, indices, weights, b1, b2),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_gathered_path_compiles_to_one_graph_and_matches_the_loop():
    """The CUDA decode path has static shapes and no host read of the routing, so it compiles without a graph
    break (checked here on the CPU with fullgraph=True) and gives the reference loop's result."""
    E, D, I = 4, 8, 6
    x = torch.randn(2, D)
    gate_up, down = torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    indices = torch.tensor([[3, E], [0, 2]])
    weights = torch.rand(2, 2)
    compiled = torch.compile(gathered_experts_forward, fullgraph=True, dynamic=False)
    got = compiled(x, gate_up, down, indices, weights, F.silu)
    torch.testing.assert_close(got, reference_loop(x, gate_up, down, indices, weights))


def test_our_implementations_are_selectable_with_capacity_and_biases():
    """ "moe_grouped" forces the torch grouped path; like "eager" it is exact with drops and expert biases, where
    transformers' implementations are refused."""
    from modeling_moe import MoeForCausalLM
    from tests.conftest import tiny_config

    model = MoeForCausalLM(tiny_config(capacity_factor_eval=0.5, mlp_bias=True)).eval()
    ids = torch.randint(3, 128, (2, 9))
    out = model(ids, output_router_logits=True)
    assert int(out.dropped_tokens.sum()) > 0  # the capacity really drops here
    model.set_experts_implementation("moe_grouped")
    torch.testing.assert_close(model(ids).logits, out.logits)
    with pytest.raises(ValueError, match="experts_implementation"):
        model.set_experts_implementation("grouped_mm")


def test_frozen_experts_with_grad_mode_on_take_the_few_token_path():
    """Grad mode on but nothing requiring grad (a frozen model outside `torch.no_grad()`), no biases: the inference
    path runs and agrees with the loop."""
    x = torch.randn(2, 8)
    gate_up, down = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    indices, weights = torch.tensor([[1, 3], [4, 0]]), torch.rand(2, 2)
    got = experts_forward(x, gate_up, down, indices, weights, F.silu)
    torch.testing.assert_close(got, reference_loop(x, gate_up, down, indices, weights))


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_small_row_float32_linear_matches_f_linear(rows, bias):
    """`_linear`'s float32 CPU kernel for a few rows (a dot per weight row and input row) computes `F.linear`,
    also on non-contiguous rows, and its bits do not depend on where the weights sit in memory (a checkpoint
    loaded from safetensors may hold them at any offset; MKL's GEMV and W @ x^T results do depend on it)."""
    from modeling_moe.experts import _linear

    w, b = torch.randn(40, 24), (torch.randn(40) if bias else None)
    x = torch.randn(24, rows).t()  # (rows, 24), column-major
    torch.testing.assert_close(_linear(x, w, b), F.linear(x, w, b))
    for offset in (1, 3):  # 4 and 12 bytes off a 64-byte boundary
        shifted = torch.empty(w.numel() + offset)[offset:].view_as(w).copy_(w)
        assert torch.equal(_linear(x, shifted, b), _linear(x, w, b))


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_float32_few_rows_per_expert_match_the_reference_loop(tokens):
    """float32 on the CPU with 1..8 rows per expert: the few-token loop (experts hit by several tokens run once on
    their rows) and the grouped path, forward and backward, against the plain loop, with biases and a drop."""
    from modeling_moe import experts as ex

    E, D, I, K = 4, 16, 12, 2
    x = torch.randn(tokens, D, requires_grad=True)
    gate_up = (torch.randn(E, 2 * I, D) * D**-0.5).requires_grad_()  # unit-scale activations: fp32 tolerances
    down = (torch.randn(E, D, I) * I**-0.5).requires_grad_()
    b1, b2 = torch.randn(E, 2 * I, requires_grad=True), torch.randn(E, D, requires_grad=True)
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(tokens)])
    indices[0, 1] = E  # one dropped assignment
    weights = torch.rand(tokens, K, requires_grad=True)
    params = (x, gate_up, down, weights, b1, b2)
    expected = reference_loop(x, gate_up, down, indices, weights, b1, b2)
    with torch.no_grad():
        few = ex.few_token_experts_forward(x, gate_up, down, indices, weights, F.silu, b1, b2)
    torch.testing.assert_close(few, expected)
    got = grouped_experts_forward(x, gate_up, down, indices, weights, F.silu, b1, b2)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    for g, e in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("tokens", [3, 40])
def test_grouped_forward_bits_do_not_depend_on_grad_mode(tokens):
    """A trainable model's eval forward (no_grad: nothing saved, SwiGLU in place) gives exactly the bits of its
    training forward, with few rows per expert and with many."""
    E, D, I, K = 4, 16, 12, 2
    x = torch.randn(tokens, D)
    gate_up = (torch.randn(E, 2 * I, D) * D**-0.5).requires_grad_()
    down = (torch.randn(E, D, I) * I**-0.5).requires_grad_()
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(tokens)])
    weights = torch.rand(tokens, K)
    with_grad = grouped_experts_forward(x, gate_up, down, indices, weights, F.silu)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = grouped_experts_forward(x, gate_up, down, indices, weights, F.silu)
    assert torch.equal(with_grad.detach(), without)
