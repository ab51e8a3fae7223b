"""Issue-3 routers, policies and layouts: hand-computed cases (derivations in comments) and transformers'
own implementations of the same mechanism as references."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_moe import MoeForCausalLM
from modeling_moe.modeling_moe import MoeSparseBlock
from modeling_moe.routing import (
    MoeRouter,
    apply_capacity,
    expert_choice_routing,
    group_limited_choice,
    keep_topk_softmax,
    priority_keep_mask,
)
from tests.conftest import tiny_config


# ------------------------------------------------------------------------------------------------ routers
def test_keep_topk_softmax_hand_case():
    # logits (1, 2, 3, 0), k = 2: keep 3 and 2, the rest -inf; softmax over (2, 3) = (1, e) / (1 + e)
    w, i = keep_topk_softmax(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), 2)
    assert i.tolist() == [[2, 1]]
    e = math.e
    torch.testing.assert_close(w, torch.tensor([[e / (1 + e), 1 / (1 + e)]]))


def test_noisy_topk_noise_only_in_training_and_trainable():
    config = tiny_config(router_type="noisy_topk")
    router = MoeRouter(config)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(6, 32)
    router.eval()
    logits, w, i, _, _ = router(x)
    w_ref, i_ref = keep_topk_softmax(logits, 2)  # eval: H(x) = x W_g exactly
    torch.testing.assert_close(w, w_ref)
    assert torch.equal(i, i_ref)
    router.train()
    torch.manual_seed(1)
    _, w_train, _, _, _ = router(x)
    assert not torch.allclose(w_train, w)  # Gaussian noise with std softplus(x W_noise) = softplus(0) = ln 2
    w_train.sum().backward() if w_train.requires_grad else None
    (router(x)[1] * torch.randn(6, 2)).sum().backward()
    assert router.noise_weight.grad is not None and router.noise_weight.grad.abs().sum() > 0


def test_group_limited_choice_hand_case():
    # 8 experts in 4 groups of 2, keep the best 2 groups by the sum of each group's top-2 scores.
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.4, 0.2, 0.2, 0.8, 0.7]])
    # group sums: g0 = 1.0, g1 = 0.9, g2 = 0.4, g3 = 1.5 -> keep g3 and g0. Note e2 (0.5) loses to e1 (0.1):
    # group limiting can exclude an expert that is better than one that is kept.
    choice = group_limited_choice(scores, n_group=4, topk_group=2)
    kept = torch.isfinite(choice)[0].tolist()
    assert kept == [True, True, False, False, False, False, True, True]


def test_sigmoid_grouped_matches_transformers_deepseek_v3_router():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    ds_config = DeepseekV3Config(
        hidden_size=32,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    theirs = DeepseekV3TopkRouter(ds_config)
    torch.nn.init.normal_(theirs.weight)
    theirs.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    config = tiny_config(
        router_type="sigmoid_grouped",
        num_local_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        router_bias_update_rate=0.001,
    )
    ours = MoeRouter(config)
    ours.weight.data.copy_(theirs.weight.data)
    ours.e_score_correction_bias.copy_(theirs.e_score_correction_bias)
    x = torch.randn(20, 32)
    logits_ref, w_ref, i_ref = theirs(x)
    logits, w, i, _, _ = ours(x)
    torch.testing.assert_close(logits.float(), logits_ref)
    # transformers returns the top-k unsorted: compare as per-token {expert: weight} maps
    order, order_ref = i.argsort(-1), i_ref.argsort(-1)
    assert torch.equal(i.gather(1, order), i_ref.gather(1, order_ref))
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref))


def test_switch_probabilities_and_choice_match_switch_transformers():
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

    st_config = SwitchTransformersConfig(d_model=32, num_experts=4, expert_capacity=10_000, router_bias=False)
    theirs = SwitchTransformersTop1Router(st_config)
    torch.nn.init.normal_(theirs.classifier.weight)
    ours = MoeRouter(tiny_config(router_type="switch", num_experts_per_tok=1))
    ours.weight.data.copy_(theirs.classifier.weight.data)
    x = torch.randn(2, 7, 32)
    one_hot_ref, probs_ref, logits_ref = theirs(x)  # capacity out of the picture (10k slots)
    logits, w, i, _, _ = ours(x.reshape(-1, 32))
    torch.testing.assert_close(logits, logits_ref.reshape(-1, 4))
    assert torch.equal(i.squeeze(-1), one_hot_ref.reshape(-1, 4).argmax(-1))
    torch.testing.assert_close(w, probs_ref.reshape(-1, 1))


def test_expert_choice_hand_case():
    # 4 tokens, 2 experts, capacity 2: expert 0 takes its 2 best tokens (t0 .6, t2 .7); expert 1 takes t1 .9, t3 .8
    scores = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.7, 0.3], [0.2, 0.8]])
    w, i = expert_choice_routing(scores, capacity=2)
    assert i.tolist() == [[0, 2], [2, 1], [0, 2], [2, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.0], [0.0, 0.9], [0.7, 0.0], [0.0, 0.8]]))
    # padding is never picked: with t2 masked, expert 0 takes t0 and t3 (.2 > .1)
    _, i = expert_choice_routing(scores, capacity=2, token_mask_T=torch.tensor([True, True, False, True]))
    assert i[:, 0].tolist() == [0, 2, 2, 0]


@pytest.mark.parametrize(("norm", "expected"), [(True, [0.4 / 0.7, 0.3 / 0.7]), (False, [0.4, 0.3])])
def test_norm_topk_prob_is_its_own_option(norm, expected):
    router = MoeRouter(tiny_config(norm_topk_prob=norm))
    x = torch.eye(4, 32)[:1]
    router.weight.data = torch.zeros(4, 32)
    router.weight.data[:, 0] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    _, w, i, _, _ = router(x)
    assert i.tolist() == [[3, 2]]
    torch.testing.assert_close(w, torch.tensor([expected]))


# ------------------------------------------------------------------------------------------------ capacity
def test_priority_policy_serves_confident_tokens_first():
    # 3 tokens all choose expert 0 (k = 1), capacity 1: token 2 has the highest weight and keeps the slot
    indices = torch.tensor([[0], [0], [0]])
    weights = torch.tensor([[0.5], [0.6], [0.9]])
    assert priority_keep_mask(indices, weights, 1, 2).tolist() == [[False], [False], [True]]


def test_next_choice_reroutes_to_the_next_expert_with_room():
    # 3 tokens, 3 experts, k = 1, capacity 1. Preferences: t0: 0>1>2, t1: 0>1>2, t2: 0>2>1.
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.7, 0.1, 0.2]])
    weights, indices = scores.topk(1, dim=-1)
    new_i, new_w = apply_capacity(indices, weights, scores, scores, capacity=1, policy="next_choice")
    # drop pass: t0 keeps e0; t1, t2 turned away. Rank 1: t1 -> e1 (room), t2 -> e2 (room).
    assert new_i.tolist() == [[0], [1], [2]]
    # the new weight keeps the token's scale: scores[new] * w_old / scores[old] = scores[new] (k = 1, no renorm)
    torch.testing.assert_close(new_w, torch.tensor([[0.5], [0.3], [0.2]]))
    # with capacity 1 and only 2 experts left for 3 tokens, one more token is dropped
    scores4 = torch.cat([scores, torch.tensor([[0.9, 0.05, 0.05]])])
    i4, w4 = apply_capacity(scores4.topk(1, -1).indices, scores4.topk(1, -1).values, scores4, scores4, 1, "next_choice")
    assert (i4 == 3).sum() == 1 and w4[i4 == 3].sum() == 0


def test_padding_does_not_take_capacity():
    # Switch, 4 real tokens + 4 padding, all prefer expert 0; capacity = ceil(4 real * 1 * 1.0 / 4) = 1
    config = tiny_config(router_type="switch", num_experts_per_tok=1, capacity_factor_eval=1.0)
    block = MoeSparseBlock(config).eval()
    block.router.weight.data.zero_()
    block.router.weight.data[0, 0] = 5.0
    x = torch.zeros(1, 8, 32)
    x[..., 0] = 1.0
    mask = torch.tensor([[False] * 4 + [True] * 4])
    seen = {}
    block.dispatcher.register_forward_hook(lambda m, a, out: seen.update(indices=out[0], dropped=out[2]))
    block(x, mask)
    # padding never routed; of the 4 real tokens only the first fits; 3 dropped
    assert seen["indices"].squeeze(-1).tolist() == [4, 4, 4, 4, 0, 4, 4, 4]
    assert int(seen["dropped"]) == 3


def test_dropped_tokens_are_reported_in_the_output():
    config = tiny_config(router_type="switch", num_experts_per_tok=1, capacity_factor_eval=0.25)
    model = MoeForCausalLM(config).eval()
    ids = torch.randint(3, 128, (2, 8))
    out = model(ids, output_router_logits=True)
    # capacity ceil(16 * 0.25 / 4) = 1 per expert: at most 4 of 16 tokens run, so at least 12 drop per layer
    assert out.dropped_tokens.shape == (2,) and (out.dropped_tokens >= 12).all()
    assert [int((ix == 4).sum()) for ix in out.router_indices] == out.dropped_tokens.tolist()
    assert model(ids).dropped_tokens is None


# ------------------------------------------------------------------------------------------------ losses
def test_importance_loss_hand_case():
    from modeling_moe.losses import importance_loss

    # probabilities (0.75, 0.25) and (0.25, 0.75) -> importance (1, 1): CV 0
    logits = torch.log(torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    assert importance_loss([logits]).item() == pytest.approx(0.0, abs=1e-7)
    # (0.75, 0.25) twice -> importance (1.5, 0.5): mean 1, population std 0.5, CV^2 = 0.25
    logits = torch.log(torch.tensor([[0.75, 0.25], [0.75, 0.25]]))
    assert importance_loss([logits]).item() == pytest.approx(0.25)


def test_per_layer_aux_loss_sees_a_hidden_imbalance():
    from modeling_moe.losses import load_balancing_loss, load_balancing_loss_per_layer

    # layer A sends everything to expert 0, layer B everything to expert 1 (k = 1, 2 experts, probs 0.9/0.1).
    a = torch.log(torch.tensor([[0.9, 0.1]] * 4))
    b = torch.log(torch.tensor([[0.1, 0.9]] * 4))
    # pooled: f = (0.5, 0.5), P = (0.5, 0.5) -> 2 * 0.5 = 1.0, the balanced value: the imbalance is hidden
    assert load_balancing_loss([a, b], 2, 1).item() == pytest.approx(1.0)
    # per layer: f = (1, 0), P = (0.9, 0.1) -> 2 * 0.9 = 1.8 for each layer
    assert load_balancing_loss_per_layer([a, b], 2, 1).item() == pytest.approx(1.8)


def test_router_losses_are_weighted_into_the_loss():
    config = tiny_config(router_aux_loss_coef=0.1, router_importance_loss_coef=0.2, router_z_loss_coef=0.3)
    model = MoeForCausalLM(config).eval()
    ids = torch.randint(3, 128, (2, 6))
    out = model(ids, labels=ids, output_router_logits=True)
    parts = model.router_losses(out.router_logits)
    ce = model.loss_function(out.logits, ids, 128)
    torch.testing.assert_close(out.loss, ce + 0.1 * parts["aux"] + 0.2 * parts["importance"] + 0.3 * parts["z"])


# ------------------------------------------------------------------------------------------------ aux-free bias
def test_bias_update_step_hand_case():
    router = MoeRouter(tiny_config(router_bias_update_rate=0.01))
    router.load_counts.copy_(torch.tensor([5.0, 1.0, 1.0, 1.0]))  # mean 2: e0 overloaded, the others under
    router.update_bias()
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert router.load_counts.sum() == 0


def test_bias_counts_once_per_forward_only_in_training():
    from modeling_moe.balancing import update_router_biases

    config = tiny_config(router_bias_update_rate=0.01, num_hidden_layers=2)
    model = MoeForCausalLM(config)
    ids = torch.randint(3, 128, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    routers = [m for m in model.modules() if isinstance(m, MoeRouter)]
    model.eval()
    model(ids, attention_mask=mask)
    assert all(r.load_counts.sum() == 0 for r in routers)  # eval never counts
    model.train()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(r.load_counts.sum() == 8 * 2 for r in routers)  # 8 real tokens x k = 2, padding excluded
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(ids, attention_mask=mask, labels=ids).loss.backward()  # recomputation must not count again
    assert all(r.load_counts.sum() == 2 * 16 for r in routers)
    before = [r.e_score_correction_bias.clone() for r in routers]
    assert update_router_biases(model) == 2
    assert all(not torch.equal(b, r.e_score_correction_bias) for b, r in zip(before, routers))
    assert "model.layers.0.mlp.router.e_score_correction_bias" in model.state_dict()


def test_trainer_callback_and_optimizer_hook_update_once_per_step():
    from modeling_moe.balancing import RouterBiasUpdateCallback, attach_router_bias_updates

    model = MoeForCausalLM(tiny_config(router_bias_update_rate=0.01)).train()
    router = model.model.layers[0].mlp.router
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = attach_router_bias_updates(model, optimizer)
    ids = torch.randint(3, 128, (2, 5))
    for _ in range(2):  # gradient accumulation: two micro-batches, one optimizer step
        model(ids, labels=ids).loss.backward()
    assert router.load_counts.sum() == 2 * 10 * 2
    optimizer.step()
    assert router.load_counts.sum() == 0 and router.e_score_correction_bias.abs().sum() > 0
    handle.remove()
    model(ids, labels=ids)
    RouterBiasUpdateCallback().on_optimizer_step(None, None, None, model=model)
    assert router.load_counts.sum() == 0


# ------------------------------------------------------------------------------------------------ layouts
def test_shared_expert_and_gate_match_qwen2_moe_block():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    q_config = Qwen2MoeConfig(
        hidden_size=32,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    )
    theirs = Qwen2MoeSparseMoeBlock(q_config).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.2)
    config = tiny_config(
        moe_intermediate_size=24,
        num_shared_experts=1,
        shared_expert_intermediate_size=40,
        shared_expert_gate=True,
        norm_topk_prob=False,
    )
    ours = MoeSparseBlock(config).eval()
    ours.router.weight.data.copy_(theirs.gate.weight.data)
    ours.experts.gate_up_proj.data.copy_(theirs.experts.gate_up_proj.data)
    ours.experts.down_proj.data.copy_(theirs.experts.down_proj.data)
    ours.shared_expert.load_state_dict(theirs.shared_expert.state_dict())
    ours.shared_expert_gate.load_state_dict(theirs.shared_expert_gate.state_dict())
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_fine_grained_experts_run_and_count():
    from modeling_moe import count_parameters

    config = tiny_config(num_local_experts=64, num_experts_per_tok=8, moe_intermediate_size=8)
    model = MoeForCausalLM(config)
    ids = torch.randint(3, 128, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    counts = count_parameters(config)
    assert counts.active["experts"] == counts.total["experts"] * 8 // 64


# ------------------------------------------------------------------------------------------------ generation
ROUTER_CASES = {
    "topk_softmax": dict(),
    "switch": dict(router_type="switch", num_experts_per_tok=1, capacity_factor_eval=1.0),
    "noisy_topk": dict(router_type="noisy_topk"),
    "sigmoid_grouped": dict(router_type="sigmoid_grouped", num_local_experts=8, n_group=4, topk_group=2),
    "expert_choice": dict(router_type="expert_choice", capacity_factor_eval=1.0),
    "priority": dict(capacity_factor_eval=1.0, capacity_policy="priority"),
    "next_choice": dict(capacity_factor_eval=1.0, capacity_policy="next_choice"),
    "shared_aux_free": dict(num_shared_experts=1, shared_expert_gate=True, router_bias_update_rate=0.01),
}


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_generate_with_every_router_cached_equals_uncached(case):
    model = MoeForCausalLM(tiny_config(**ROUTER_CASES[case])).eval()
    for router in (m for m in model.modules() if isinstance(m, MoeRouter)):
        torch.nn.init.normal_(router.weight, std=0.5)  # decisive routing
    ids = torch.randint(3, 128, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_expert_choice_generation_falls_back_to_token_choice_topk():
    ec = MoeForCausalLM(tiny_config(router_type="expert_choice", capacity_factor_eval=1.0)).eval()
    tc = MoeForCausalLM(tiny_config(router_type="topk_softmax", norm_topk_prob=False)).eval()
    tc.load_state_dict(ec.state_dict())
    ids = torch.randint(3, 128, (1, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ec.generate(ids, **kwargs), tc.generate(ids, **kwargs))
    # outside generate, expert choice is really used: the full-sequence logits differ from token choice
    assert not torch.allclose(ec(ids).logits, tc(ids).logits)


def test_expert_choice_trains():
    model = MoeForCausalLM(tiny_config(router_type="expert_choice", capacity_factor_train=1.0)).train()
    ids = torch.randint(3, 128, (2, 8))
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0
    # every expert takes exactly C = ceil(16 * 2 * 1.0 / 4) = 8 tokens
    counts = torch.bincount(out.router_indices[0].reshape(-1), minlength=5)[:4]
    assert counts.tolist() == [8, 8, 8, 8]


def test_load_counts_reach_every_router_of_a_wrapped_block():
    """peft's `modules_to_save` wraps a router as {original, trained copy}: both must count the same load."""
    import copy

    model = MoeForCausalLM(tiny_config(router_bias_update_rate=0.01, num_hidden_layers=2)).train()

    class Wrapper(torch.nn.Module):  # the shape of peft's ModulesToSaveWrapper
        def __init__(self, router):
            super().__init__()
            self.original_module = router
            self.modules_to_save = torch.nn.ModuleDict({"default": copy.deepcopy(router)})

        def forward(self, *args, **kwargs):
            return self.modules_to_save["default"](*args, **kwargs)

    block0 = model.model.layers[0].mlp
    block0.router = Wrapper(block0.router)
    ids = torch.randint(3, 128, (2, 5))
    model(ids, labels=ids)
    original, trained = block0.router.original_module, block0.router.modules_to_save["default"]
    assert original.load_counts.sum() == trained.load_counts.sum() == 10 * 2
    layer1 = model.model.layers[1].mlp.router
    assert layer1.load_counts.sum() == 10 * 2  # the second layer's routing went to the second layer
