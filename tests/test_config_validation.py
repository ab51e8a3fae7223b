"""MoeConfig refuses misspelt fields and other families' names with the right name, warns once about other unknown
keys (not about transformers' own), range-checks every numeric field, and refuses a config with no MoE layer."""

from __future__ import annotations

import json
import warnings

import pytest

from modeling_moe import MoeConfig, MoeConfigError, MoeForCausalLM, load_preset
from modeling_moe.configuration_moe import MoeConfigWarning
from tests.conftest import tiny_config
from training import train


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("num_expert", "num_local_experts"),
        ("num_expertz", "num_local_experts"),
        ("num_experts_per_token", "num_experts_per_tok"),
        ("top_k", "num_experts_per_tok"),
        ("capacity_factor", "capacity_factor_train / capacity_factor_eval"),
        ("n_routed_experts", "num_local_experts"),
        ("router_typ", "router_type"),
        ("rms_norm_epsilon", "rms_norm_eps"),
    ],
)
def test_misspelt_or_foreign_field_is_refused_with_the_right_name(key, suggestion):
    with pytest.raises(MoeConfigError, match=f"'{key}' is not a MoeConfig field.*{suggestion}"):
        tiny_config(**{key: 3})


def test_a_preset_with_a_misspelt_field_is_refused(tmp_path):
    path = tmp_path / "preset.json"
    path.write_text(json.dumps({"num_experts_per_token": 3}))
    with pytest.raises(MoeConfigError, match="num_experts_per_tok"):
        load_preset(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        load_preset(path)


def test_the_num_experts_alias_is_applied_and_validated():
    assert tiny_config(num_experts=6).num_local_experts == 6
    with pytest.raises(MoeConfigError, match=r"num_experts_per_tok \(2\) must be <= num_local_experts \(1\)"):
        tiny_config(num_experts=1)


def test_other_unknown_keys_are_kept_and_listed_once_in_a_warning():
    with pytest.warns(MoeConfigWarning, match=r"\['hub_extra', 'my_note'\]") as record:
        config = tiny_config(my_note="x", hub_extra=1)
    assert len(record) == 1 and config.my_note == "x"


def test_saved_folders_and_transformers_keys_do_not_warn(tmp_path):
    MoeForCausalLM(tiny_config()).save_pretrained(tmp_path)  # config.json has transformers_version, auto_map, dtype
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoeConfigWarning)
        MoeConfig.from_pretrained(tmp_path)
        MoeForCausalLM.from_pretrained(tmp_path)
        tiny_config(torch_dtype="float32", max_length=20, rope_theta=1e4, name_or_path="x")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(pad_token_id=500), r"pad_token_id must be None or a token id in \[0, vocab_size=128\), got 500"),
        (dict(pad_token_id=-3), r"pad_token_id must be None or a token id in \[0, vocab_size=128\), got -3"),
        (dict(eos_token_id=[2, 128]), r"eos_token_id must be None or a token id in \[0, vocab_size=128\)"),
        (dict(attention_dropout=1.5), r"attention_dropout must be a number in \[0, 1\), got 1.5"),
        (dict(rope_theta=-1), r"rope_theta .* must be a number > 0, got -1"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 0.0}), "rope_theta .* must be a number > 0"),
        (dict(num_hidden_layers=None), "num_hidden_layers must be an integer >= 1, got None"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be an integer >= 1, got 0"),
        (dict(hidden_size=32.0), "hidden_size must be an integer >= 1, got 32.0"),
        (dict(num_key_value_heads=-2), "num_key_value_heads must be an integer >= 1"),
        (dict(rms_norm_eps=float("inf")), "rms_norm_eps must be a number > 0"),
        (dict(initializer_range=-0.1), "initializer_range must be a number >= 0"),
        (dict(moe_layers=[]), r"no MoE layer .*moe_layers=\[\]"),
        (dict(moe_layer_frequency=3), r"no MoE layer .*moe_layer_frequency=3, num_hidden_layers=2"),
        (dict(mlp_layer_types=["dense", "dense"]), "no MoE layer"),
    ],
)
def test_numeric_fields_are_range_checked_at_construction(overrides, match):
    with pytest.raises(MoeConfigError, match=match):
        tiny_config(**overrides)


def test_config_overrides_on_a_saved_model_are_validated(tmp_path):
    MoeForCausalLM(tiny_config()).save_pretrained(tmp_path)

    def load(overrides: dict) -> MoeConfig:
        args = train.ModelArguments(model_name_or_path=str(tmp_path), config_overrides=json.dumps(overrides))
        return train.load_config(args)

    assert load({"capacity_factor_train": 1.5}).capacity_factor_train == 1.5
    with pytest.raises(MoeConfigError, match="'num_expertz' is not a MoeConfig field; did you mean num_local"):
        load({"num_expertz": 9})
    with pytest.raises(MoeConfigError, match="capacity_factor_train must be None"):
        load({"capacity_factor_train": -1})
