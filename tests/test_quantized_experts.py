"""Weight-only quantized experts (modeling_moe/quantized_experts.py): against a dequantize-then-plain-loop
reference, every router type and capacity policy, the whole model against full precision, save / reload bitwise,
the remote-code round trip, accounting and eval, LoRA on top, and bad requests."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from modeling_moe import MoeConfigError, MoeForCausalLM, QuantizationError, count_parameters, quantize_experts
from modeling_moe.accounting import weight_bytes
from modeling_moe.quantized_experts import (
    FUSED_ROWS,
    QuantizedMoeExperts,
    _pack_int4,
    _unpack_int4,
    dequantize_weight,
    quantize_weight,
)
from tests.conftest import tiny_config
from tests.test_remote_code import LOADER, REPO_ROOT

SCHEMES = {"int8": dict(dtype="int8"), "int4": dict(dtype="int4", group_size=16)}
SPECS = {"int8": {"bits": 8}, "int4": {"bits": 4, "group_size": 16}}


def plain_loop(x_TD, gate_up_EHD, down_EDI, indices_TK, weights_TK, act_fn, b1=None, b2=None):
    """The reference: token by token, choice by choice, float weights; the sentinel E is skipped."""
    E, I = gate_up_EHD.shape[0], down_EDI.shape[-1]
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(x_TD.shape[1], dtype=torch.float32)
        for k in range(indices_TK.shape[1]):
            e = int(indices_TK[t, k])
            if e == E:
                continue
            gu = F.linear(x_TD[t].float(), gate_up_EHD[e].float(), None if b1 is None else b1[e].float())
            h = act_fn(gu[:I]) * gu[I:]
            y = y + weights_TK[t, k].float() * F.linear(h, down_EDI[e].float(), None if b2 is None else b2[e].float())
        rows.append(y)
    return torch.stack(rows)


def quantized_module(scheme: str, mlp_bias: bool = False, hidden_act: str = "silu") -> QuantizedMoeExperts:
    config = tiny_config(expert_quantization=SPECS[scheme], mlp_bias=mlp_bias, hidden_act=hidden_act)
    module = QuantizedMoeExperts(config)
    E, D, I = config.num_local_experts, config.hidden_size, config.moe_intermediate_size
    module.load_float_weights(torch.randn(E, 2 * I, D) * 0.1, torch.randn(E, D, I) * 0.1)
    if mlp_bias:
        module.gate_up_proj_bias.data.normal_(std=0.1)
        module.down_proj_bias.data.normal_(std=0.1)
    return module


def routing(T, E=4, K=2, drop=0.25):
    indices_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    indices_TK[torch.rand(T, K) < drop] = E  # dropped assignments: the sentinel index
    weights_TK = torch.rand(T, K).softmax(-1)
    return indices_TK, weights_TK


# ------------------------------------------------------------------ the scheme
@pytest.mark.parametrize("scheme", sorted(SPECS))
def test_quantization_error_is_at_most_half_a_step(scheme):
    bits, group = SPECS[scheme]["bits"], SPECS[scheme].get("group_size")
    w = torch.randn(3, 8, 32)
    w[0, 0] = 0.0  # an all-zero row quantizes to zero (scale 0), without NaN
    q, scale = quantize_weight(w, bits, group)
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.shape == ((3, 8, 32) if bits == 8 else (3, 8, 16)) and scale.dtype == torch.float32
    w_hat = dequantize_weight(q, scale, bits, torch.float32)
    step = scale.unsqueeze(-1) if bits == 8 else scale.repeat_interleave(group, dim=-1)
    assert torch.all((w - w_hat).abs() <= step / 2 + 1e-7)
    assert torch.equal(w_hat[0, 0], torch.zeros(32))


def test_int4_packing_round_trips_every_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32): every 4-bit value in both nibbles
    assert torch.equal(_unpack_int4(_pack_int4(q)), q)
    assert torch.equal(_unpack_int4(_pack_int4(q.flip(-1))), q.flip(-1))


# ------------------------------------------------------------------ experts against the plain loop
@pytest.mark.parametrize("scheme", sorted(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, FUSED_ROWS - 1, 24])  # decode sizes (int8: torch's fused kernel) and larger
def test_quantized_experts_match_dequantize_then_plain_loop(scheme, dtype, T):
    module = quantized_module(scheme, mlp_bias=True).to(dtype)
    x_TD = torch.randn(T, 32, dtype=dtype)
    indices_TK, weights_TK = routing(T)
    with torch.no_grad():
        out = module(x_TD, indices_TK, weights_TK)
    gate_up, down = module.dequantized(dtype)
    expected = plain_loop(x_TD, gate_up, down, indices_TK, weights_TK, F.silu, module.gate_up_proj_bias,
                          module.down_proj_bias)  # fmt: skip
    assert out.dtype == dtype and out.shape == (T, 32)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), expected, **tol)


@pytest.mark.parametrize("scheme", sorted(SPECS))
def test_gradients_reach_input_and_routing_weights_not_the_frozen_weights(scheme):
    module = quantized_module(scheme, hidden_act="gelu")
    x_TD = torch.randn(10, 32, requires_grad=True)
    indices_TK, weights_TK = routing(10)
    weights_TK.requires_grad_(True)
    module(x_TD, indices_TK, weights_TK).square().sum().backward()
    gate_up, down = module.dequantized()
    x_ref, w_ref = x_TD.detach().clone().requires_grad_(True), weights_TK.detach().clone().requires_grad_(True)
    plain_loop(x_ref, gate_up, down, indices_TK, w_ref, F.gelu).square().sum().backward()
    torch.testing.assert_close(x_TD.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights_TK.grad, w_ref.grad, atol=1e-5, rtol=1e-5)
    assert not module.gate_up_proj.requires_grad and module.gate_up_proj.grad is None


# ------------------------------------------------------------------ the whole model
ROUTERS = {
    "topk_softmax": dict(),
    "switch_drop": dict(router_type="switch", num_experts_per_tok=1, capacity_factor_eval=1.0),
    "noisy_topk_priority": dict(router_type="noisy_topk", capacity_factor_eval=1.0, capacity_policy="priority"),
    "sigmoid_grouped_next_choice": dict(
        router_type="sigmoid_grouped", num_local_experts=8, n_group=4, topk_group=2, capacity_factor_eval=1.0,
        capacity_policy="next_choice", num_shared_experts=1, shared_expert_gate=True,
    ),
    "expert_choice": dict(router_type="expert_choice", mlp_bias=True),
    "soft": dict(router_type="soft", router_aux_loss_coef=0.0),
}  # fmt: skip


def dequantized_float_model(quantized: MoeForCausalLM, float_model: MoeForCausalLM) -> MoeForCausalLM:
    """`float_model` with every expert's weights replaced by the quantized model's dequantized ones."""
    reference = copy.deepcopy(float_model)
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedMoeExperts):
            gate_up, down = module.dequantized()
            target = reference.get_submodule(name)
            target.gate_up_proj.data.copy_(gate_up)
            target.down_proj.data.copy_(down)
    return reference


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_and_capacity_policy_equals_the_dequantized_float_model(router):
    model = MoeForCausalLM(tiny_config(**ROUTERS[router])).eval()
    quantized = quantize_experts(copy.deepcopy(model), "int8")
    reference = dequantized_float_model(quantized, model)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        out = quantized(ids, output_router_logits=True)
        expected = reference(ids, output_router_logits=True)
    for got, want in zip(out.router_indices or (), expected.router_indices or ()):
        assert torch.equal(got, want)  # the same routing, drops included
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)


# The stated error against full precision on this tiny random model (max |logit| about 0.4): int8 changes a
# logit by at most 1e-3, int4 (groups of 16) by at most 1e-2.
LOGIT_ERROR = {"int8": 1e-3, "int4": 1e-2}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_whole_model_within_stated_logit_error_of_full_precision_and_generates(scheme):
    model = MoeForCausalLM(tiny_config()).eval()
    quantized = quantize_experts(copy.deepcopy(model), **SCHEMES[scheme])
    assert quantized.config.expert_quantization == SPECS[scheme]
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        error = (quantized(ids).logits - model(ids).logits).abs().max().item()
    assert 0 < error < LOGIT_ERROR[scheme]
    generated = quantized.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)
    # attention, router, embeddings and head are untouched
    for name, p in model.named_parameters():
        if ".mlp.experts." not in name:
            assert torch.equal(p, quantized.get_parameter(name)), name


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_save_reload_bitwise_as_safetensors(tmp_path, scheme):
    model = quantize_experts(MoeForCausalLM(tiny_config(mlp_bias=True)).eval(), **SCHEMES[scheme])
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "quantized_experts.py").exists()
    assert json.loads((tmp_path / "config.json").read_text())["expert_quantization"] == SPECS[scheme]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        weight = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj")
        scale = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj_scale")
    assert weight.dtype == (torch.int8 if scheme == "int8" else torch.uint8) and scale.dtype == torch.float32
    reloaded = MoeForCausalLM.from_pretrained(tmp_path).eval()
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert saved[key].dtype == loaded[key].dtype and torch.equal(saved[key], loaded[key]), key
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
        assert torch.equal(model(ids[:1, :1]).logits, reloaded(ids[:1, :1]).logits)  # the fused decode path


def test_remote_code_round_trip_in_a_fresh_process(tmp_path):
    config = tiny_config(router_type="switch", num_experts_per_tok=1, moe_layers=[1], capacity_factor_eval=1.5)
    model = quantize_experts(MoeForCausalLM(config).eval(), "int4", group_size=16)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    ids = torch.randint(3, 128, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(LOADER.format(repo=str(REPO_ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        local = model(ids)
    assert torch.equal(remote["logits"], local.logits)
    expected = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(remote["generated"], expected)


# ------------------------------------------------------------------ accounting, eval, LoRA
def test_parameter_counts_unchanged_and_weight_bytes_are_real():
    config = tiny_config()
    model = MoeForCausalLM(config)
    E, D, I, layers = config.num_local_experts, config.hidden_size, config.moe_intermediate_size, 2
    full = count_parameters(model)
    assert weight_bytes(model)["experts"] == full.total["experts"] * 4
    for scheme, bytes_per_weight in (("int8", 1), ("int4", 0.5)):
        quantized = quantize_experts(copy.deepcopy(model), **SCHEMES[scheme])
        counts = count_parameters(quantized)
        assert counts.total == full.total and counts.active == full.active
        assert count_parameters(quantized.config).total == full.total  # from the config, on the meta device
        scales = E * (2 * I + D) * (1 if scheme == "int8" else 0) + E * (2 * I * D + D * I) // 16 * (scheme == "int4")
        assert weight_bytes(quantized)["experts"] == full.total["experts"] * bytes_per_weight + 4 * scales * layers


def test_eval_reports_a_quantized_model_with_its_real_weight_bytes(tmp_path):
    from eval.run import main
    from modeling_moe.corpus import stdlib_paragraphs
    from modeling_moe.hub import save_hub_ready
    from training.tokenizer import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(stdlib_paragraphs(max_chars=20_000), vocab_size=300)
    model = MoeForCausalLM(tiny_config(vocab_size=300)).eval()
    save_hub_ready(model, tmp_path / "full", tokenizer=tokenizer)
    save_hub_ready(quantize_experts(copy.deepcopy(model), "int8"), tmp_path / "int8", tokenizer=tokenizer)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(stdlib_paragraphs(max_chars=3000)[:4]) + "\n")
    results = main(
        ["--model", str(tmp_path / "int8"), "--compare_model", str(tmp_path / "full"), "--dataset", str(texts),
         "--output_dir", str(tmp_path / "out"), "--max_length", "32", "--cost_rounds", "1", "--cost_seq_len", "8",
         "--cost_new_tokens", "2", "--lm_eval_tasks", ""]
    )  # fmt: skip
    params = results["cost"]["parameters"]
    assert params["expert_quantization"] == {"bits": 8}
    assert params["loaded_weight_bytes"]["components"] == weight_bytes(quantize_experts(copy.deepcopy(model), "int8"))
    assert params["loaded_weight_bytes"]["total"] < params["weight_memory_bytes"]["fp32"]
    assert "random weights" in results["cost"]["throughput"]["reference"]  # Mixtral cannot hold int8 experts
    ppl = {name: q["perplexity"] for name, q in results["quality"]["models"].items()}
    assert abs(ppl["model"] - ppl["compare_model"]) < 1e-2 * ppl["compare_model"]
    assert "as loaded (experts int8 per channel)" in (tmp_path / "out" / "report.html").read_text()


def test_lora_on_top_of_frozen_int8_experts_trains_and_expert_lora_is_refused():
    from peft import LoraConfig, get_peft_model

    from training.lora import EXPERT_PARAMETERS, LoraTargetError, resolve_lora_targets

    model = quantize_experts(MoeForCausalLM(tiny_config()), "int8")
    with pytest.raises(LoraTargetError, match=r"quantized .* --lora_target_parameters none"):
        resolve_lora_targets(model, ["q_proj"], list(EXPERT_PARAMETERS))
    targets = resolve_lora_targets(model, ["q_proj", "v_proj"], [])
    experts_before = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets.wrapped_modules, init_lora_weights=False))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (2, 12))
    losses = []
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in peft_model.base_model.model.state_dict().items():
        if k in experts_before:
            assert torch.equal(v, experts_before[k]), k


# ------------------------------------------------------------------ bad requests
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="fp8"), "dtype must be one of \\['int4', 'int8'\\], got 'fp8'"),
        (dict(dtype="int4"), "group_size must be an even integer >= 2 with bits=4, got None"),
        (dict(dtype="int4", group_size=5), "group_size must be an even integer"),
        (dict(dtype="int4", group_size=24), "group_size 24 must divide hidden_size \\(32\\)"),
        (dict(dtype="int8", group_size=16), "group_size must be None with bits=8"),
    ],
)
def test_bad_quantize_requests_are_refused(kwargs, match):
    model = MoeForCausalLM(tiny_config())
    with pytest.raises(QuantizationError, match=match):
        quantize_experts(model, **kwargs)
    assert model.config.expert_quantization is None


def test_bad_configs_and_unsupported_uses_are_refused():
    with pytest.raises(MoeConfigError, match="bits must be one of \\(8, 4\\), got 3"):
        tiny_config(expert_quantization={"bits": 3})
    with pytest.raises(MoeConfigError, match="unknown keys \\['scheme'\\]"):
        tiny_config(expert_quantization={"bits": 8, "scheme": "awq"})
    with pytest.raises(MoeConfigError, match="group_size 32 must divide moe_intermediate_size \\(48\\)"):
        tiny_config(expert_quantization={"bits": 4, "group_size": 32})
    model = quantize_experts(MoeForCausalLM(tiny_config()), "int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_experts(model, "int8")
    with pytest.raises(ValueError, match="'grouped_mm' cannot run quantized experts"):
        model.set_experts_implementation("grouped_mm")
    from modeling_moe.convert import to_mixtral

    with pytest.raises(ValueError, match="expert_quantization"):
        to_mixtral(model)
