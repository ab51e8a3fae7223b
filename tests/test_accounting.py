"""Parameter accounting: the published Mixtral 8x7B split, and agreement with real parameters."""

from __future__ import annotations

import pytest

from modeling_moe import MoeForCausalLM, count_parameters, load_preset
from tests.conftest import tiny_config


def test_mixtral_8x7b_published_split():
    counts = count_parameters(load_preset("mixtral-8x7b"))  # meta device: no 187 GB allocation
    assert round(counts.total_params / 1e9, 1) == 46.7
    assert round(counts.active_params / 1e9, 1) == 12.9
    assert round(counts.total["experts"] / 1e9, 1) == 45.1
    assert counts.total["dense_ffn"] == 0


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_word_embeddings=True),
        dict(num_hidden_layers=3, moe_layers=[1], attention_bias=True, mlp_bias=True),
        dict(router_type="switch", num_experts_per_tok=1),
    ],
)
def test_counts_match_real_parameters(overrides):
    config = tiny_config(**overrides)
    model = MoeForCausalLM(config)
    from_config, from_model = count_parameters(config), count_parameters(model)
    assert from_config == from_model
    assert from_config.total_params == sum(p.numel() for p in model.parameters())
    k, e = config.num_experts_per_tok, config.num_local_experts
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert from_config.total["experts"] == expert_params
    assert from_config.active_params == from_config.total_params - expert_params + round(expert_params * k / e)
    if config.tie_word_embeddings:
        assert from_config.total["head"] == 0


def test_rejects_other_objects():
    with pytest.raises(TypeError, match="MoeConfig"):
        count_parameters("mixtral")


@pytest.mark.parametrize(
    ("preset", "total_b", "active_b"),
    [("olmoe-1b-7b", 6.9, 1.3), ("qwen2-moe-a2.7b", 14.3, 2.7)],  # the published figures
)
def test_published_shapes(preset, total_b, active_b):
    counts = count_parameters(load_preset(preset))
    assert round(counts.total_params / 1e9, 1) == total_b
    assert round(counts.active_params / 1e9, 1) == active_b


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-switch", "tiny-deepseek-v3-style"])
def test_tiny_presets_train_a_step(preset):
    import torch

    model = MoeForCausalLM(load_preset(preset)).train()
    ids = torch.randint(3, 512, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n and "noise" not in n)
