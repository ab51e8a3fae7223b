"""Router semantics on hand-computed cases: top-k renormalisation, Switch scaling, capacity, drops."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_moe.modeling_moe import MoeSparseBlock
from modeling_moe.routing import capacity_keep_mask, expert_capacity, switch_routing, topk_softmax_routing
from tests.conftest import tiny_config


def test_topk_softmax_renormalises_the_kept_probabilities():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    weights, indices = topk_softmax_routing(logits, k=2)
    assert indices.tolist() == [[3, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.4 / 0.7, 0.3 / 0.7]]))
    raw, _ = topk_softmax_routing(logits, k=2, renormalize=False)
    torch.testing.assert_close(raw, torch.tensor([[0.4, 0.3]]))


def test_switch_scales_by_the_router_probability():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]]))
    weights, indices = switch_routing(logits)
    assert indices.tolist() == [[1], [0]]
    torch.testing.assert_close(weights, torch.tensor([[0.6], [0.5]]))


def test_softmax_is_float32_for_half_inputs():
    weights, _ = topk_softmax_routing(torch.randn(5, 4, dtype=torch.bfloat16), k=2)
    assert weights.dtype == torch.float32


@pytest.mark.parametrize(
    ("tokens", "k", "factor", "experts", "expected"),
    [(8, 1, 1.0, 4, 2), (8, 2, 1.25, 4, 5), (10, 1, 1.0, 4, 3), (1, 2, 1.0, 8, 1), (64, 2, 2.0, 8, 32)],
)
def test_capacity_arithmetic(tokens, k, factor, experts, expected):
    assert expert_capacity(tokens, k, factor, experts) == expected == math.ceil(tokens * k * factor / experts)


def test_capacity_rejects_non_positive_factor():
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(8, 1, 0.0, 4)


def test_capacity_fills_first_choices_before_second_choices_in_token_order():
    # 4 tokens, k = 2, 3 experts, capacity 2 per expert.
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    keep = capacity_keep_mask(indices, capacity=2, num_experts=3)
    # First choices in token order: e0 <- t0, t1 (full), t2 dropped; e1 <- t3.
    # Second choices: e1 <- t0 (e1 now full), e2 <- t1, e1 <- t2 dropped, e0 <- t3 dropped (e0 full).
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]


class FixedRouter(torch.nn.Module):
    """A hand-set router: returns the given logits whatever the input, routed by the real routing function."""

    def __init__(self, logits_TE: torch.Tensor, router_type: str, k: int) -> None:
        super().__init__()
        self.logits_TE, self.router_type, self.k = logits_TE, router_type, k

    def forward(self, x_TD, capacity=None, token_mask_T=None, token_choice_only=True):
        probs = torch.softmax(self.logits_TE, -1)
        if self.router_type == "switch":
            return (self.logits_TE, *switch_routing(self.logits_TE), probs, probs)
        return (self.logits_TE, *topk_softmax_routing(self.logits_TE, self.k), probs, probs)


def _fixed_block(router_type: str, capacity_factor: float | None, logits: torch.Tensor) -> MoeSparseBlock:
    k = 1 if router_type == "switch" else 2
    config = tiny_config(
        router_type=router_type,
        num_experts_per_tok=k,
        capacity_factor_train=capacity_factor,
        capacity_factor_eval=capacity_factor,
    )
    block = MoeSparseBlock(config).eval()
    torch.nn.init.normal_(block.experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(block.experts.down_proj, std=0.2)
    block.router = FixedRouter(logits, router_type, k)
    return block


def _expert(block: MoeSparseBlock, e: int, x: torch.Tensor) -> torch.Tensor:
    gate_up = x @ block.experts.gate_up_proj[e].T
    i = block.experts.intermediate_dim
    return (torch.nn.functional.silu(gate_up[..., :i]) * gate_up[..., i:]) @ block.experts.down_proj[e].T


def test_switch_block_drops_overflow_tokens_to_an_exact_zero_update():
    # 6 tokens all prefer expert 0; capacity = ceil(6 * 1 * 1.0 / 4) = 2, so tokens 2..5 are dropped.
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]]).repeat(6, 1)
    block = _fixed_block("switch", 1.0, logits)
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        y = block(x)[0]
    p0 = torch.softmax(logits[0], -1)[0]
    torch.testing.assert_close(y[:2], p0 * _expert(block, 0, x[0, :2]))
    assert torch.equal(y[2:], torch.zeros_like(y[2:]))  # dropped: the layer adds exactly nothing to the residual


def test_dropless_block_routes_every_token():
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]]).repeat(6, 1)
    block = _fixed_block("switch", None, logits)
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        y = block(x)[0]
    p0 = torch.softmax(logits[0], -1)[0]
    torch.testing.assert_close(y, p0 * _expert(block, 0, x[0]))


def test_topk_block_with_capacity_keeps_surviving_assignments():
    # 4 tokens, k = 2 of 4 experts, capacity ceil(4*2*0.5/4) = 1 per expert.
    logits = torch.tensor([[4.0, 3.0, 0.0, 0.0], [4.0, 0.0, 3.0, 0.0], [0.0, 0.0, 4.0, 3.0], [0.0, 0.0, 0.0, 4.0]])
    block = _fixed_block("topk_softmax", 0.5, logits)
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        y = block(x)[0]
    w, _ = topk_softmax_routing(logits, 2)
    # first choices: t0->e0 ok, t1->e0 drop, t2->e2 ok, t3->e3 ok; second: t0->e1 ok, t1->e2 drop, t2->e3 drop
    torch.testing.assert_close(y[0], w[0, 0] * _expert(block, 0, x[0, 0]) + w[0, 1] * _expert(block, 1, x[0, 0]))
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    torch.testing.assert_close(y[2], w[2, 0] * _expert(block, 2, x[0, 2]))
    torch.testing.assert_close(y[3], w[3, 0] * _expert(block, 3, x[0, 3]))


def test_capacity_factor_follows_the_mode_and_generation():
    block = MoeSparseBlock(tiny_config(capacity_factor_train=1.25, capacity_factor_eval=2.0))
    assert block.train().capacity_factor() == 1.25
    assert block.eval().capacity_factor() == 2.0
    block.in_generation = True
    assert block.capacity_factor() is None
    block.capacity_in_generation = True
    assert block.capacity_factor() == 2.0


# Every router type and capacity policy, in training mode (capacity, noise and jitter on): the block must equal the
# plain per-assignment loop over the routing its own router and dispatcher produced, with the same gradients.
ROUTINGS = {
    "topk_softmax": dict(),
    "topk_capacity_drop": dict(capacity_factor_train=0.5, capacity_policy="drop"),
    "topk_capacity_priority": dict(capacity_factor_train=0.5, capacity_policy="priority"),
    "topk_capacity_next_choice": dict(capacity_factor_train=0.75, capacity_policy="next_choice"),
    "switch_capacity": dict(router_type="switch", num_experts_per_tok=1, capacity_factor_train=1.0),
    "noisy_topk_jitter": dict(router_type="noisy_topk", router_jitter_noise=0.1),
    "sigmoid_grouped_bias": dict(
        router_type="sigmoid_grouped",
        num_local_experts=8,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        router_bias_update_rate=0.01,
    ),
    "expert_choice": dict(router_type="expert_choice"),
    "mlp_bias": dict(mlp_bias=True, capacity_factor_train=0.5),
}


@pytest.mark.parametrize("impl", ["eager", "moe_grouped"])
@pytest.mark.parametrize("case", list(ROUTINGS))
def test_block_equals_the_reference_loop_under_every_router(case, impl):
    from modeling_moe import MoeForCausalLM
    from tests.test_experts import reference_loop

    torch.manual_seed(0)
    model = MoeForCausalLM(tiny_config(**ROUTINGS[case])).double().train()
    model.set_experts_implementation(impl)
    block = model.model.layers[0].mlp
    experts = block.experts
    routed = {}
    block.dispatcher.register_forward_hook(lambda m, args, out: routed.update(indices=out[0], weights=out[1]))
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    y = block(x)
    expected = reference_loop(
        x.view(-1, 32),
        experts.gate_up_proj,
        experts.down_proj,
        routed["indices"],
        routed["weights"],
        experts.gate_up_proj_bias,
        experts.down_proj_bias,
    ).view_as(y)
    if "capacity" in case or case in ("expert_choice", "mlp_bias"):
        assert (routed["indices"] == experts.num_experts).any(), "this case is meant to drop assignments"
    torch.testing.assert_close(y, expected)
    wrt = [x, block.router.weight, experts.gate_up_proj, experts.down_proj]
    upstream = torch.randn_like(y)
    got_grads = torch.autograd.grad(y, wrt, upstream, retain_graph=True)  # the router's graph is shared
    for got, want in zip(got_grads, torch.autograd.grad(expected, wrt, upstream)):
        torch.testing.assert_close(got, want)
