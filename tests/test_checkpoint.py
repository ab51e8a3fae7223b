"""Broken checkpoints fail in every loader of ours (naming the tensors and the file) instead of running random
weights; plain `from_pretrained` keeps transformers' behaviour but warns about routers / experts it initialised."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from eval.errors import EvalInputError
from eval.loading import load_model
from modeling_moe import MoeForCausalLM, UpcyclingError, upcycle
from modeling_moe.checkpoint import CheckpointError, load_pretrained
from modeling_moe.convert import from_mixtral
from modeling_moe.modeling_moe import MoeWeightsInitializedWarning
from tests.conftest import tiny_config
from training import finetune_lora, train

ROUTER = "model.layers.1.mlp.router.weight"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "good"
    torch.manual_seed(0)
    MoeForCausalLM(tiny_config(router_type="switch", num_experts_per_tok=1)).save_pretrained(folder)
    return folder


def broken(good: Path, tmp_path: Path, case: str) -> Path:
    """A copy of `good` broken in one way."""
    folder = tmp_path / case
    shutil.copytree(good, folder)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    if case == "missing_router":
        del state[ROUTER]
    elif case == "missing_experts":
        state = {k: v for k, v in state.items() if ".experts." not in k}
    elif case == "unexpected":
        state["model.layers.0.mlp.router.extra"] = torch.zeros(2)
    elif case == "wrong_shape":
        state[K_PROJ] = torch.zeros(3, 3)
    elif case == "more_layers":
        config = json.loads((folder / "config.json").read_text())
        config.update(num_hidden_layers=3, mlp_layer_types=["sparse"] * 3, moe_layers=[0, 1, 2])
        config["layer_types"] = ["full_attention"] * 3
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return folder
    elif case == "pickle_only":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
        return folder
    elif case == "no_router_type":
        config = json.loads((folder / "config.json").read_text())
        del config["router_type"]
        (folder / "config.json").write_text(json.dumps(config))
        return folder
    save_file(state, weights, metadata={"format": "pt"})
    return folder


CASES = {
    "missing_router": rf"missing \(would be initialised at random\): {ROUTER}",
    "missing_experts": r"missing .*model\.layers\.0\.mlp\.experts\.down_proj",
    "unexpected": r"model\.safetensors.*unexpected \(would be ignored\): model\.layers\.0\.mlp\.router\.extra",
    "wrong_shape": rf"wrong shape: {K_PROJ} \(model\.safetensors\): checkpoint \(3, 3\) vs model \(16, 32\)",
    "more_layers": r"missing .*model\.layers\.2\.",
    "truncated": r"model\.safetensors is not a readable safetensors file",
    "pickle_only": r"only pickle weights \['pytorch_model\.bin'\]",
    "no_router_type": r"config\.json lacks the routing field\(s\) \['router_type'\]",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_strict_loader_refuses_naming_tensors_and_file(good, tmp_path, case):
    folder = broken(good, tmp_path, case)
    with pytest.raises(CheckpointError, match=CASES[case]):
        load_pretrained(MoeForCausalLM, folder)


def test_strict_loader_loads_a_good_checkpoint_exactly(good):
    model = load_pretrained(MoeForCausalLM, good)
    state = load_file(good / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_eval_refuses_broken_checkpoints(good, tmp_path):
    for case in ("missing_router", "pickle_only", "no_router_type", "truncated"):
        with pytest.raises(EvalInputError, match=CASES[case]):
            load_model(str(broken(good, tmp_path, case)))


def test_train_refuses_broken_checkpoints(good, tmp_path):
    model_args = train.ModelArguments(model_name_or_path=str(broken(good, tmp_path, "wrong_shape")))
    tokenizer = [0] * 8  # build_model only needs len(tokenizer)
    with pytest.raises(CheckpointError, match=CASES["wrong_shape"]):
        train.build_model(model_args, tiny_config(), tokenizer)
    with pytest.raises(CheckpointError, match=CASES["no_router_type"]):
        train.load_config(train.ModelArguments(model_name_or_path=str(broken(good, tmp_path, "no_router_type"))))


def test_finetune_lora_refuses_broken_checkpoints(good, tmp_path):
    parser = finetune_lora.make_parser()
    for case in ("pickle_only", "no_router_type", "truncated"):
        folder = broken(good, tmp_path, case)
        argv = ["--model_name_or_path", str(folder), "--train_file", "x.txt", "--output_dir", str(tmp_path / "o")]
        lora_args, _, args, *_ = finetune_lora.parse_arguments(parser, argv)
        with pytest.raises(CheckpointError, match=CASES[case]):
            finetune_lora.validate_lora_arguments(lora_args, args)


def test_mixtral_conversion_refuses_missing_tensors(tmp_path):
    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    state = load_file(tmp_path / "mixtral" / "model.safetensors")
    del state[next(k for k in state if "gate" in k and "experts" not in k)]
    save_file(state, tmp_path / "mixtral" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing .*gate"):
        from_mixtral(tmp_path / "mixtral")


def _dense_llama(folder: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)


def test_upcycling_refuses_nan_weights_and_corrupt_shards(tmp_path):
    _dense_llama(tmp_path / "dense")
    weights = tmp_path / "dense" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(UpcyclingError, match=r"NaN or Inf values in model\.layers\.1\.mlp\.up_proj\.weight"):
        upcycle(tmp_path / "dense", num_experts=2)
    weights.write_bytes(b"garbage" * 10)
    with pytest.raises(UpcyclingError, match=r"model\.safetensors is not a readable safetensors file"):
        upcycle(tmp_path / "dense", num_experts=2)


@pytest.mark.parametrize("case", ["missing_router", "missing_experts", "wrong_shape"])
def test_plain_from_pretrained_loads_but_warns_about_initialised_routing(good, tmp_path, case):
    folder = broken(good, tmp_path, case)
    expected = {"missing_router": ROUTER, "missing_experts": "experts", "wrong_shape": None}[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=case == "wrong_shape")
        _, info = MoeForCausalLM.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True)
    assert isinstance(model, MoeForCausalLM)  # transformers' behaviour is kept: it loads
    moe_warnings = [str(w.message) for w in caught if issubclass(w.category, MoeWeightsInitializedWarning)]
    if expected is None:  # an attention tensor: transformers' own report, no routing warning
        assert not moe_warnings and info["mismatched_keys"]
    else:
        assert len(moe_warnings) == 2 and all(expected in m for m in moe_warnings), moe_warnings
        assert info["missing_keys"]


def test_folder_without_config_json_does_not_build_the_default_config(good, tmp_path):
    folder = tmp_path / "no_config"
    shutil.copytree(good, folder)
    (folder / "config.json").unlink()
    with pytest.raises(OSError, match=r"has no config\.json"):
        MoeForCausalLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        load_pretrained(MoeForCausalLM, folder)


def test_fresh_load_refuses_missing_tensors(good, tmp_path, monkeypatch, hf_modules_cache):
    from training import fresh_load

    folder = broken(good, tmp_path, "missing_router")
    monkeypatch.setitem(sys.modules, "modeling_moe", sys.modules["modeling_moe"])  # main() hides it; restored after
    with pytest.raises(SystemExit, match=rf"does not match its config: {{'missing_keys': \['{ROUTER}'\]}}"):
        fresh_load.main(str(folder), "hi")
