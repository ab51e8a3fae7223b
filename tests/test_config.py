"""MoeConfig: validation errors name the field, layer resolution, presets, save/load."""

from __future__ import annotations

import json

import pytest

from modeling_moe import MoeConfig, MoeConfigError, load_preset, preset_names
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(num_local_experts=0), "num_local_experts"),
        (dict(capacity_factor_train=0), "capacity_factor_train"),
        (dict(capacity_factor_eval=-1.0), "capacity_factor_eval"),
        (dict(capacity_factor_train="big"), "capacity_factor_train"),
        (dict(hidden_size=30), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(router_type="expert_choice_typo"), "router_type"),
        (dict(router_type="switch"), "num_experts_per_tok"),
        (dict(moe_layers=[2]), "moe_layers"),
        (dict(moe_layers=[-1]), "moe_layers"),
        (dict(moe_layers=[0, 0]), "moe_layers"),
        (dict(moe_layer_frequency=0), "moe_layer_frequency"),
        (dict(mlp_layer_types=["sparse"]), "mlp_layer_types"),
        (dict(mlp_layer_types=["sparse", "moe"]), "mlp_layer_types"),
        (dict(moe_layers=[0], mlp_layer_types=["dense", "sparse"]), "mlp_layer_types"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "sliding_window"),
        (dict(layer_types=["full_attention"]), "layer_types"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(hidden_act="not_an_activation"), "hidden_act"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (dict(router_z_loss_coef=float("nan")), "router_z_loss_coef"),
        (dict(router_jitter_noise=1.5), "router_jitter_noise"),
        (dict(rms_norm_eps=0), "rms_norm_eps"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(attention_bias="yes"), "attention_bias"),
        (dict(rope_parameters=5), "rope_parameters"),
        (dict(rope_parameters={"rope_type": "bogus"}), "rope_type"),
        (dict(rope_parameters={"rope_type": "linear"}), "rope_parameters"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field) as info:
        tiny_config(**overrides)
    assert isinstance(info.value, MoeConfigError)


def test_head_dim_may_be_given_when_heads_do_not_divide_hidden():
    config = tiny_config(hidden_size=30, head_dim=8)
    assert config.resolved_head_dim == 8


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (dict(num_hidden_layers=4), [0, 1, 2, 3]),
        (dict(num_hidden_layers=4, moe_layer_frequency=2), [1, 3]),
        (dict(num_hidden_layers=6, moe_layer_frequency=3), [2, 5]),
        (dict(num_hidden_layers=4, moe_layer_frequency=2, moe_layers=[0, 2]), [0, 2]),
        (dict(num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"]), [1, 2]),
    ],
)
def test_moe_layer_resolution_fills_the_standard_field(overrides, expected):
    config = tiny_config(**overrides)
    assert config.moe_layers == expected
    assert config.mlp_layer_types == ["sparse" if i in expected else "dense" for i in range(config.num_hidden_layers)]


def test_sliding_window_defaults_every_layer_to_sliding():
    assert tiny_config(sliding_window=16).layer_types == ["sliding_attention"] * 2
    assert tiny_config().layer_types == ["full_attention"] * 2


def test_save_and_load_round_trip(tmp_path):
    config = tiny_config(
        num_hidden_layers=4,
        moe_layer_frequency=2,
        router_type="switch",
        num_experts_per_tok=1,
        capacity_factor_train=1.25,
        capacity_factor_eval=2.0,
        qkv_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "moe_lm"
    assert saved["auto_map"]["AutoConfig"] == "configuration_moe.MoeConfig"
    loaded = MoeConfig.from_pretrained(tmp_path)
    for key in ("moe_layers", "mlp_layer_types", "router_type", "capacity_factor_train", "qkv_bias", "rope_parameters"):
        assert getattr(loaded, key) == getattr(config, key), key


def test_no_new_field_is_named_like_a_generation_parameter(tmp_path):
    from transformers import GenerationConfig, MixtralConfig

    generation_params = set(GenerationConfig._get_default_generation_params())
    ours = set(MoeConfig().to_dict()) - set(MixtralConfig().to_dict())  # the fields this repository adds
    assert ours and not generation_params & ours
    tiny_config().save_pretrained(tmp_path)  # transformers refuses to save a config that breaks the rule


def test_presets_load_and_validate():
    names = preset_names()
    assert {"mixtral-8x7b", "tiny-mixtral", "tiny-switch", "switch-base"} <= set(names)
    for name in names:
        config = load_preset(name)
        assert not hasattr(config, "_comment")
    assert load_preset("tiny-switch").router_type == "switch"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="tiny-mixtral"):
        load_preset("no-such-preset")


def test_preset_override_is_validated():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        load_preset("tiny-mixtral", num_experts_per_tok=99)
