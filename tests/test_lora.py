"""`python -m training.finetune_lora` on a tiny trained MoE: routers bitwise unchanged, drift reported, merge equals
unmerged, ESFT leaves unselected experts bitwise unchanged (weight decay and optimizer state included), router
options, and bad targets fail before training."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from modeling_moe import MoeForCausalLM
from modeling_moe.routing_stats import routing_kl
from tests.conftest import tiny_config
from tests.training_helpers import TINY_OVERRIDES, make_corpus, tiny_run_args
from training import finetune_lora, train
from training.data import DataError
from training.lora import (
    ExpertSliceFreezer,
    LoraTargetError,
    default_module_targets,
    lora_config,
    resolve_lora_targets,
    routing_kl_loss,
)
from training.train import TrainArgumentError

SHARED = '{"num_shared_experts": 1, "shared_expert_gate": true, "shared_expert_intermediate_size": 32}'


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny MoE with a gated shared expert, trained for 6 steps; returns (corpus, model folder, cache)."""
    root = tmp_path_factory.mktemp("lora_base")
    corpus = make_corpus(root)
    overrides = {**json.loads(TINY_OVERRIDES), **json.loads(SHARED)}
    args = tiny_run_args(corpus, root / "train", root / "cache", max_steps=6, config_overrides=json.dumps(overrides))
    results = train.main(args)
    return corpus, results["final_model_dir"], root / "cache"


def lora_args(base, out, **extra) -> list[str]:
    corpus, model_dir, cache = base
    values = {
        "model_name_or_path": model_dir,
        "train_file": str(corpus),
        "output_dir": str(out),
        "cache_dir": str(cache),
        "block_size": "32",
        "per_device_train_batch_size": "4",
        "learning_rate": "5e-3",
        "max_steps": "6",
        "logging_steps": "3",
        "save_steps": "100",
        "disable_tqdm": "true",
        "drift_max_batches": "4",
    }
    values.update({k: str(v) for k, v in extra.items()})
    return [item for key, value in values.items() for item in (f"--{key}", value)]


def router_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".router." in k or "shared_expert_gate" in k}


def test_routers_bitwise_unchanged_drift_reported_and_merge_equals_unmerged(base, tmp_path):
    out = tmp_path / "lora"
    results = finetune_lora.main(lora_args(base, out, merge="true", lora_target_modules="all-linear"))
    base_state = load_file(f"{base[1]}/model.safetensors")
    merged_state = load_file(out / "merged" / "model.safetensors")
    routers = router_tensors(base_state)
    assert len(routers) == 4  # 2 routers + 2 shared-expert gates
    for name, tensor in routers.items():
        assert torch.equal(tensor, merged_state[name]), name
    changed = [k for k in base_state if not torch.equal(base_state[k], merged_state[k])]
    assert any("experts.gate_up_proj" in k for k in changed) and any("q_proj" in k for k in changed)
    assert results["routers_changed"] == []

    drift = results["drift"]
    assert [x["layer"] for x in drift["layers"]] == [0, 1]
    for layer in drift["layers"]:
        assert 0.0 <= layer["topk_agreement"] <= 1.0 and layer["kl"] >= 0.0
    assert drift["mean_kl"] > 0.0, "attention and expert LoRA change the routers' inputs"
    assert (out / "drift.json").is_file() and (out / "adapter" / "drift.json").is_file()

    # merged == unmerged, from the saved folders
    assert results["merge_max_abs_logit_diff"] <= finetune_lora.MERGE_TOLERANCE
    adapter_model = PeftModel.from_pretrained(MoeForCausalLM.from_pretrained(base[1]), out / "adapter").eval()
    merged = MoeForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_model(ids).logits, rtol=0, atol=1e-4)
    assert merged.config.router_aux_loss_coef == MoeForCausalLM.from_pretrained(base[1]).config.router_aux_loss_coef
    assert "lora" in (out / "merged" / "README.md").read_text()


def test_peft_all_linear_wraps_the_shared_expert_gate_but_our_config_excludes_every_router():
    model = MoeForCausalLM(tiny_config(num_shared_experts=1, shared_expert_gate=True))
    assert default_module_targets(model) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    plain = get_peft_model(MoeForCausalLM(model.config), LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {n for n, m in plain.named_modules() if hasattr(m, "lora_A")}
    assert any(n.endswith("mlp.shared_expert_gate") for n in wrapped), "peft wraps a router-like gate"
    assert not any(n.endswith("mlp.router") for n in wrapped), "MoeRouter is not an nn.Linear"

    targets = resolve_lora_targets(model, "all-linear", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    ours = get_peft_model(model, lora_config(model, targets, r=2, alpha=4))
    wrapped = {n for n, m in ours.named_modules() if hasattr(m, "lora_A")}
    assert not any("router" in n or "shared_expert_gate" in n for n in wrapped)
    assert any(n.endswith("mlp.experts") for n in wrapped)
    assert not [n for n, p in ours.named_parameters() if p.requires_grad and ("router" in n or "gate." in n)]


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        ({"lora_target_modules": "router"}, LoraTargetError, "names router modules"),
        ({"lora_target_modules": "shared_expert_gate"}, LoraTargetError, "names router modules"),
        ({"lora_target_parameters": "mlp.router.weight"}, LoraTargetError, "names router parameters"),
        ({"lora_target_modules": "q_proj,nonexistent_proj"}, LoraTargetError, "'nonexistent_proj' matches no module"),
        ({"lora_target_parameters": "experts.up_proj"}, LoraTargetError, "matches no parameter"),
        ({"block_size": "128"}, DataError, "--block_size 128 is above"),
        ({"train_file": "/nonexistent.txt"}, FileNotFoundError, "--train_file"),
        ({"lora_dropout": "0.1"}, LoraTargetError, "--lora_dropout must be 0"),
        ({"esft_top_p": "1.5"}, TrainArgumentError, "--esft_top_p must be in"),
    ],
)
def test_bad_arguments_fail_before_training(base, tmp_path, extra, error, match):
    out = tmp_path / "lora"
    with pytest.raises(error, match=match):
        finetune_lora.main(lora_args(base, out, **extra))
    assert not (out / "adapter").exists() and not list(out.glob("checkpoint-*"))


def test_router_opt_in_allows_router_lora(base, tmp_path):
    results = finetune_lora.main(
        lora_args(base, tmp_path / "lora", lora_target_parameters="mlp.router.weight", lora_routers="true", max_steps=2)
    )
    assert results["global_step"] == 2


def test_esft_trains_only_selected_experts_bitwise(base, tmp_path):
    out = tmp_path / "esft"
    results = finetune_lora.main(lora_args(base, out, esft_top_p=0.5, weight_decay=0.1, merge="true"))
    selected = results["esft_experts"]
    assert set(selected) == {"0", "1"} and all(1 <= len(v) < 4 for v in selected.values())
    base_state = load_file(f"{base[1]}/model.safetensors")
    merged = load_file(out / "merged" / "model.safetensors")
    for layer, experts in selected.items():
        for param in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{param}"
            for e in range(4):
                same = torch.equal(base_state[key][e], merged[key][e])
                assert same == (e not in experts), (key, e, experts)
    untouched = [k for k in base_state if "experts" not in k]
    assert all(torch.equal(base_state[k], merged[k]) for k in untouched), "ESFT default: only experts adapt"


def test_expert_slice_freezer_keeps_values_and_optimizer_state_of_frozen_experts():
    model = MoeForCausalLM(tiny_config())
    targets = resolve_lora_targets(model, [], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = get_peft_model(model, lora_config(model, targets, r=2, alpha=4))
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.02)  # nonzero B too, so frozen slices would move without the freezer
    freezer = ExpertSliceFreezer(peft_model, {0: [1], 1: [0, 2]})
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    freezer.attach(optimizer)
    ids = torch.randint(3, 128, (2, 16))
    for _ in range(3):
        peft_model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert freezer.violations(optimizer) == []
    assert len(freezer.entries) == 8  # 2 layers x 2 parameters x (A, B)
    moved = [label for label, p, mask, snap in freezer.entries if not torch.equal(p[mask == 1], snap[mask == 1])]
    assert len(moved) == 8, "the selected experts' slices train"

    freezer.remove()  # without the restore hook, weight decay moves the frozen slices
    peft_model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert freezer.violations(optimizer)


def test_router_lr_scale_trains_routers_in_their_own_group_and_routing_kl_is_on(base, tmp_path):
    results = finetune_lora.main(
        lora_args(base, tmp_path / "lora", router_lr_scale=0.1, routing_kl_coef=1.0, max_steps=3)
    )
    groups = results["param_groups"]
    router_groups = [g for g in groups if g["router"]]
    assert router_groups and all(g["lr"] == pytest.approx(5e-4) for g in router_groups)
    assert all(g["lr"] == pytest.approx(5e-3) for g in groups if not g["router"] and g["params"])
    assert len(results["routers_changed"]) == 4
    assert any(entry.get("routing_kl", -1) >= 0 for entry in results["log_history"]), "the KL term is logged"


def test_routing_kl_loss_is_the_differentiable_routing_kl():
    ref = [torch.randn(10, 4), torch.randn(10, 4)]
    cur = [torch.randn(10, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)]
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    loss = routing_kl_loss(ref, cur, mask)
    expected = sum(routing_kl(r, c.detach(), mask) for r, c in zip(ref, cur)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert cur[0].grad.abs().sum() > 0 and cur[0].grad[8:].abs().sum() == 0  # padding rows get no gradient
    same = routing_kl_loss(ref, [r.clone().requires_grad_() for r in ref], mask)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_router_lr_scale_with_aux_free_bias_updates_one_bias_per_router(tmp_path):
    """peft's `modules_to_save` keeps the base router and trains a copy; with aux-loss-free balancing both count the
    same load, the bias moves by exactly +-rate per expert per optimizer step (DeepSeek-V3's sign rule), and the
    adapter and the merged model carry the trained copy's bias."""
    corpus = make_corpus(tmp_path)
    rate, steps = 0.01, 3
    overrides = {**json.loads(TINY_OVERRIDES), "router_bias_update_rate": rate}
    base_args = tiny_run_args(
        corpus, tmp_path / "base", tmp_path / "cache", max_steps=2, config_overrides=json.dumps(overrides)
    )
    model_dir = train.main(base_args)["final_model_dir"]
    out = tmp_path / "lora"
    args = lora_args((corpus, model_dir, tmp_path / "cache"), out, router_lr_scale=0.1, update_router_bias="true")
    args += ["--max_steps", str(steps), "--merge", "true"]
    results = finetune_lora.main(args)
    assert results["global_step"] == steps
    base_bias = {k: v for k, v in load_file(f"{model_dir}/model.safetensors").items() if "e_score_correction" in k}
    merged = load_file(out / "merged" / "model.safetensors")
    assert len(base_bias) == 2
    moved = 0
    for name, before in base_bias.items():
        delta = (merged[name] - before) / rate  # each step adds -rate, 0 or +rate per expert
        torch.testing.assert_close(delta, delta.round(), rtol=0, atol=1e-4)
        assert delta.abs().max() <= steps + 1e-4
        moved += int(delta.abs().sum().round())
    assert moved > 0, "the biases were updated during fine-tuning"
    adapter = PeftModel.from_pretrained(MoeForCausalLM.from_pretrained(model_dir), out / "adapter")
    for layer in adapter.base_model.model.model.layers:
        wrapped = layer.mlp.router
        original, trained = wrapped.original_module, wrapped.modules_to_save["default"]
        name = f"model.layers.{layer.self_attn.layer_idx}.mlp.router.e_score_correction_bias"
        torch.testing.assert_close(trained.e_score_correction_bias, merged[name])  # what the adapter saved
        assert not torch.equal(trained.weight, original.weight)  # the copy trained at router_lr_scale x lr
