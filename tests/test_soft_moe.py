"""Soft MoE (router_type="soft", the causal Mixture-of-Tokens form): against an independent loop, causality,
grouping across the batch, padding, generation, conversion to top-k, and the rest of the stack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_moe import MoeForCausalLM
from modeling_moe.configuration_moe import MoeConfigError
from modeling_moe.convert import to_mixtral
from modeling_moe.modeling_moe import SoftMoeBlock
from modeling_moe.routing import soft_dispatch_weights
from modeling_moe.routing_stats import RoutingAccumulator
from modeling_moe.soft_conversion import soft_to_topk
from tests.conftest import tiny_config

SOFT = dict(router_type="soft", router_aux_loss_coef=0.0)


def soft_config(**overrides):
    return tiny_config(**{**SOFT, **overrides})


def reference_soft_layer(block: SoftMoeBlock, x_BSD: torch.Tensor, mask_BS: torch.Tensor, G: int) -> torch.Tensor:
    """Soft MoE by plain loops: groups of batch rows [0, G), [G, 2G), ... at each position; per slot, a softmax
    over the group's real tokens; per token, a softmax over all slots; experts from the raw weights (float64)."""
    B, S, D = x_BSD.shape
    phi = block.router.weight.double()  # (P, D)
    n = block.slots_per_expert
    gate_up, down = block.experts.gate_up_proj.double(), block.experts.down_proj.double()
    inter = down.shape[-1]

    def expert(e, v):
        h = gate_up[e] @ v
        return down[e] @ (F.silu(h[:inter]) * h[inter:])

    y = torch.zeros(B, S, D, dtype=torch.float64)
    for start in range(0, B, G):
        rows = list(range(start, min(start + G, B)))
        for s in range(S):
            members = [b for b in rows if mask_BS[b, s]]
            slot_out = []
            for p in range(phi.shape[0]):
                if members:
                    logits = torch.stack([x_BSD[b, s].double() @ phi[p] for b in members])
                    weights = torch.softmax(logits, 0)
                    slot_in = sum(w * x_BSD[b, s].double() for w, b in zip(weights, members))
                else:
                    slot_in = torch.zeros(D, dtype=torch.float64)
                slot_out.append(expert(p // n, slot_in))
            for b in rows:
                combine = torch.softmax(phi @ x_BSD[b, s].double(), 0)
                y[b, s] = sum(c * o for c, o in zip(combine, slot_out))
    return y


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(soft_group_size=0), "soft_group_size"),
        (dict(soft_slots_per_expert=True), "soft_slots_per_expert"),
        (dict(soft_eval_group_size=1.5), "soft_eval_group_size"),
        (dict(router_aux_loss_coef=0.01), "router_aux_loss_coef"),
        (dict(capacity_factor_train=1.25), "capacity_factor_train"),
        (dict(router_bias_update_rate=0.01), "router_bias_update_rate"),
        (dict(norm_topk_prob=True), "norm_topk_prob"),
    ],
)
def test_config_refuses_bad_soft_fields(overrides, field):
    with pytest.raises(MoeConfigError, match=field):
        soft_config(**overrides)


def test_soft_fields_need_the_soft_router():
    with pytest.raises(MoeConfigError, match="soft_group_size=4 needs router_type='soft'"):
        tiny_config(soft_group_size=4)


# ------------------------------------------------------------------------------------------------ the layer
def test_dispatch_weights_of_padding_are_exactly_zero():
    logits_NMP = torch.randn(3, 4, 5) * 10
    mask_NM = torch.tensor([[True, False, True, True], [False] * 4, [True, True, True, False]])
    dispatch = soft_dispatch_weights(logits_NMP, mask_NM)
    assert torch.all(dispatch[~mask_NM] == 0)
    assert torch.all(dispatch[1] == 0)  # a group with no real token: zero slot inputs, no 0/0
    torch.testing.assert_close(dispatch[[0, 2]].sum(dim=1), torch.ones(2, 5))


@pytest.mark.parametrize(("G", "B", "mode"), [(1, 2, "eval"), (2, 3, "train"), (3, 3, "train")])
def test_block_equals_the_reference_loop(G, B, mode):
    config = soft_config(soft_slots_per_expert=2, soft_group_size=G, soft_eval_group_size=G)
    block = SoftMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    block.train(mode == "train")
    x = torch.randn(B, 4, config.hidden_size)
    mask = torch.ones(B, 4, dtype=torch.bool)
    mask[0, 0] = mask[-1, 3] = False  # padding at both ends
    expected = reference_soft_layer(block, x, mask, G)
    torch.testing.assert_close(block(x, mask).double(), expected, rtol=1e-4, atol=1e-5)


def test_g1_is_the_dense_soft_mixture_closed_form():
    """G = 1: dispatch weights are 1, so y = sum_e sum_s C[s] expert_e(x), the combine softmax over slots."""
    config = soft_config(soft_slots_per_expert=3)
    block = SoftMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, config.hidden_size)
    y = block(x)
    inter = config.moe_intermediate_size
    for b in range(2):
        for s in range(3):
            xv = x[b, s].double()
            combine = torch.softmax(block.router.weight.double() @ xv, 0)
            want = torch.zeros_like(xv)
            for e in range(config.num_local_experts):
                h = block.experts.gate_up_proj[e].double() @ (xv * 1.0)  # dispatch weight 1
                out = block.experts.down_proj[e].double() @ (F.silu(h[:inter]) * h[inter:])
                for slot in range(3):
                    want += combine[e * 3 + slot] * out
            torch.testing.assert_close(y[b, s].double(), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the model
def _model(**overrides):
    model = MoeForCausalLM(soft_config(**overrides))
    for p in model.parameters():  # large enough weights that every dependence is visible
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("mode", ["train", "eval_g1", "eval_g2"])
@pytest.mark.parametrize("padding", [False, True])
@torch.no_grad()
def test_causal(mode, padding):
    model = _model(soft_group_size=2, soft_eval_group_size=2 if mode == "eval_g2" else 1)
    model.train(mode == "train")
    ids = torch.randint(3, 128, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    if padding:
        mask[1, :3] = 0  # left padding
        mask[2, 8:] = 0  # right padding
    t = 5
    changed = ids.clone()
    changed[:, t + 1 :] = torch.randint(3, 128, (4, 10 - t - 1))
    a = model(ids, attention_mask=mask).logits
    b = model(changed, attention_mask=mask).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@torch.no_grad()
def test_training_groups_mix_sequences_of_one_group_only():
    model = _model(soft_group_size=2).train()
    ids = torch.randint(3, 128, (5, 6))  # groups {0, 1}, {2, 3}, {4}
    base = model(ids).logits
    same_group = ids.clone()
    same_group[1] = torch.randint(3, 128, (6,))
    other_group = ids.clone()
    other_group[2] = torch.randint(3, 128, (6,))
    assert not torch.allclose(model(same_group).logits[0], base[0])
    torch.testing.assert_close(model(other_group).logits[[0, 1, 4]], base[[0, 1, 4]], rtol=0, atol=1e-5)
    # the last, smaller group is the sequence alone
    torch.testing.assert_close(model(ids[4:]).logits[0], base[4], rtol=0, atol=1e-5)
    # eval mode (soft_eval_group_size=1): no sequence depends on another
    model.eval()
    torch.testing.assert_close(model(same_group).logits[0], model(ids).logits[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_padding_takes_no_share_of_a_slot():
    model = _model(soft_group_size=4).train()
    ids = torch.randint(3, 128, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[3, 4:] = 0
    other_pad = ids.clone()
    other_pad[3, 4:] = torch.randint(3, 128, (2,))
    a = model(ids, attention_mask=mask).logits
    b = model(other_pad, attention_mask=mask).logits
    torch.testing.assert_close(a[:3], b[:3], rtol=0, atol=1e-5)  # real tokens ignore what the padding holds


def test_gradients_reach_every_expert_and_phi():
    model = _model(soft_group_size=2, soft_slots_per_expert=2).train()
    ids = torch.randint(3, 128, (3, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    for layer in model.model.layers:
        block = layer.mlp
        assert torch.all(block.experts.gate_up_proj.grad.abs().sum(dim=(1, 2)) > 0)
        assert torch.all(block.experts.down_proj.grad.abs().sum(dim=(1, 2)) > 0)
        assert torch.all(block.router.weight.grad.abs().sum(dim=1) > 0)


@torch.no_grad()
def test_generation_is_per_sequence_and_cached_equals_uncached():
    model = _model(soft_group_size=2).eval()
    ids = torch.randint(3, 128, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=mask)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    alone = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(alone[0], cached[0])
    model.train()  # generation uses G = 1 even in training mode
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), cached)


@torch.no_grad()
def test_routing_records_and_statistics():
    model = _model(soft_slots_per_expert=2).eval()
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = model(ids, attention_mask=mask, output_router_logits=True)
    E = model.config.num_local_experts
    assert len(out.router_logits) == len(out.router_indices) == 2
    assert torch.equal(out.router_indices[0], torch.arange(E).expand(12, E))
    assert out.dropped_tokens.tolist() == [0, 0]
    acc = RoutingAccumulator.for_config(model.config)
    acc.update(out, mask)
    layer = acc.summary()[0]
    assert layer["load_cv"] == 0.0 and layer["dropped_fraction"] == 0.0 and layer["dead_experts"] == []
    # expert mass: the mean over real tokens of each expert's combine weight (the sum over its slots)
    block = model.model.layers[0].mlp
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    model(ids, attention_mask=mask)
    handle.remove()
    x_TD = captured["x"].reshape(-1, model.config.hidden_size)
    combine_TE = torch.softmax(x_TD @ block.router.weight.T, -1).view(-1, E, 2).sum(-1)
    torch.testing.assert_close(torch.softmax(out.router_logits[0], -1), combine_TE)
    real = mask.reshape(-1).bool()
    torch.testing.assert_close(
        torch.tensor(layer["expert_mass"], dtype=torch.float64), combine_TE[real].mean(0).double()
    )


# ------------------------------------------------------------------------------------------------ conversion
@torch.no_grad()
def test_soft_to_topk_with_all_experts_equals_the_soft_model():
    """One slot per expert and k = E: the converted top-k router gives the soft combine weights exactly."""
    model = _model(soft_group_size=2).eval()
    converted = soft_to_topk(model, top_k=model.config.num_local_experts)
    assert converted.config.router_type == "topk_softmax" and converted.config.router_aux_loss_coef == 0.001
    ids = torch.randint(3, 128, (3, 7))
    torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_soft_to_topk_router_is_the_slot_mean_of_phi():
    model = _model(soft_slots_per_expert=3)
    converted = soft_to_topk(model, top_k=2)
    phi = model.model.layers[1].mlp.router.weight.view(4, 3, -1)
    torch.testing.assert_close(converted.model.layers[1].mlp.router.weight, phi.mean(dim=1))
    assert converted.config.num_experts_per_tok == 2
    with pytest.raises(MoeConfigError, match="top_k"):
        soft_to_topk(model, top_k=5)


def test_to_mixtral_refuses_soft(tmp_path):
    with pytest.raises(ValueError, match="router_type='soft'"):
        to_mixtral(_model())


# ------------------------------------------------------------------------------------------------ the stack
def test_router_stable_lora_freezes_phi():
    from peft import get_peft_model

    from training.lora import lora_config, resolve_lora_targets, trainable_router_parameters

    model = _model()
    targets = resolve_lora_targets(model, "all-linear", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = get_peft_model(model, lora_config(model, targets, r=2, alpha=4))
    assert trainable_router_parameters(peft_model) == []
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if n.endswith("mlp.router.weight"))
    ids = torch.randint(3, 128, (2, 6))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


def test_training_accepts_soft_without_balancing():
    from training.train import check_balancing

    assert "router soft" in check_balancing(soft_config(), allow_no_balancing=False)


def test_toy_experiment_smoke(tmp_path):
    import json

    from training.soft_moe_toy_experiment import main

    args = ["--corpus_chars", "20000", "--vocab_size", "300", "--hidden_size", "32", "--expert_intermediate_size"]
    args += ["32", "--num_layers", "1", "--num_heads", "2", "--seq_len", "16", "--batch_size", "4", "--steps", "2"]
    args += ["--transition_steps", "2", "--eval_every", "2", "--eval_blocks", "4", "--seeds", "0", "1"]
    args += ["--threads", "1"]  # tiny ops: thread synchronisation would dominate on a loaded machine
    threads = torch.get_num_threads()
    try:
        summary = main([*args, "--out_dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() sets the global thread count
    assert (tmp_path / "soft_moe_toy.png").stat().st_size > 0
    saved = json.loads((tmp_path / "soft_moe_toy.json").read_text())
    assert [r["seed"] for r in saved["seeds"]] == [0, 1]
    assert saved["expert_rows_per_token"] == {"topk": 2, "soft_training": 2.0, "soft_g1": 4}
    first = summary["seeds"][0]
    assert [s for s, _ in first["curves"]["soft_g1"]] == [0, 2]
    # the conversion starts from the soft model's weights: its loss is finite and the curve starts at step 2
    assert first["curves"]["converted"][0][0] == 2 and first["converted_before_tuning"] < 10
    with pytest.raises(ValueError, match="equal active FLOPs"):
        main([*args, "--soft_group_size", "1", "--out_dir", str(tmp_path)])


def test_trainer_steps_and_eval_routing_report(tmp_path):
    from transformers import TrainingArguments, default_data_collator

    from eval.report import plot_load_heatmap
    from eval.routing import collect_routing
    from training.train import MoeTrainer

    model = _model(soft_group_size=2)
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    ids = torch.randint(3, 128, (4, 8))
    data = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
        report_to="none", disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    MoeTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()
    assert not torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, before)
    capture = collect_routing(model.eval(), [list(range(3, 40))], max_length=8, batch_size=2, max_tokens=None)
    layer = capture.summary[0]
    assert layer["dropped_fraction"] == 0.0 and sum(layer["expert_mass"]) == pytest.approx(1.0)
    routing = {"layers": [{"layer": i, **s} for i, s in enumerate(capture.summary)]}
    assert plot_load_heatmap(routing, "expert_mass")  # the report's heatmap for soft routing
