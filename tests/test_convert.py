"""Parity with transformers' Mixtral in both directions: same weights, same logits (1e-5, fp32), same tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from modeling_moe import MoeForCausalLM
from modeling_moe.convert import from_mixtral, to_mixtral
from tests.conftest import tiny_config


def _mixtral(**overrides) -> MixtralForCausalLM:
    values = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
    )
    values.update(overrides)
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**values)).eval()


def _assert_same_function(ours: MoeForCausalLM, theirs: MixtralForCausalLM) -> None:
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for attention_mask in (None, mask):
        a = ours(ids, attention_mask=attention_mask).logits
        b = theirs(ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:1], **kwargs), theirs.generate(ids[:1], **kwargs))
    # the same aux loss under transformers' convention
    out_theirs = theirs(ids, attention_mask=mask, output_router_logits=True)
    torch.testing.assert_close(ours(ids, attention_mask=mask).aux_loss, out_theirs.aux_loss)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(sliding_window=5), dict(tie_word_embeddings=True), dict(num_experts_per_tok=1, head_dim=16)],
)
def test_from_mixtral_object(overrides):
    theirs = _mixtral(**overrides)
    ours = from_mixtral(theirs)
    assert isinstance(ours, MoeForCausalLM)
    _assert_same_function(ours, theirs)


def test_from_mixtral_directory(tmp_path):
    theirs = _mixtral()
    theirs.save_pretrained(tmp_path)
    _assert_same_function(from_mixtral(tmp_path), theirs)


def test_from_mixtral_rejects_other_architectures(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'mixtral'"):
        from_mixtral(tmp_path)
    with pytest.raises(TypeError, match="MixtralForCausalLM"):
        from_mixtral(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=6), dict(num_experts_per_tok=3)])
def test_to_mixtral(overrides):
    ours = MoeForCausalLM(tiny_config(moe_intermediate_size=48, **overrides)).eval()
    theirs = to_mixtral(ours)
    assert isinstance(theirs, MixtralForCausalLM)
    _assert_same_function(ours, theirs)


def test_round_trip_is_exact():
    ours = MoeForCausalLM(tiny_config()).eval()
    back = from_mixtral(to_mixtral(ours))
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(moe_layers=[1]), "moe_layers"),
        (dict(router_type="switch", num_experts_per_tok=1), "router_type"),
        (dict(capacity_factor_eval=2.0), "capacity_factor_eval"),
        (dict(capacity_factor_train=1.0), "capacity_factor_train"),
        (dict(router_type="expert_choice"), "router_type='expert_choice'"),
        (dict(qkv_bias=True), "qkv_bias"),
        (dict(norm_topk_prob=False), "norm_topk_prob"),
        (dict(routed_scaling_factor=2.0), "routed_scaling_factor"),
        (dict(num_shared_experts=1), "num_shared_experts"),
        (dict(router_bias_update_rate=0.01), "router_bias_update_rate"),
        (dict(sliding_window=4, layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    ],
)
def test_to_mixtral_refuses_what_mixtral_cannot_express(overrides, field):
    with pytest.raises(ValueError, match=field):
        to_mixtral(MoeForCausalLM(tiny_config(**overrides)))


def test_to_mixtral_refuses_a_sharded_model():
    model = MoeForCausalLM(tiny_config())
    model._is_distributed_loading_by_transformers = True  # what from_pretrained(distributed_config=...) sets
    with pytest.raises(ValueError, match="to_mixtral takes an unsharded model"):
        to_mixtral(model)
