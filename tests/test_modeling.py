"""Model behaviour: outputs, losses in the forward, cache, gradient checkpointing, dtypes, attention back-ends."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from modeling_moe import MoeConfig, MoeForCausalLM, MoeForSequenceClassification, MoeModel, load_balancing_loss
from modeling_moe.modeling_moe import MoeSparseBlock
from tests.conftest import tiny_config


def _ids(batch=2, seq=10, vocab=128):
    return torch.randint(3, vocab, (batch, seq))


def test_output_type_aux_loss_and_router_logits():
    model = MoeForCausalLM(tiny_config(num_hidden_layers=3, moe_layers=[0, 2])).eval()
    ids = _ids()
    out = model(ids)
    assert isinstance(out, MoeCausalLMOutputWithPast)
    assert out.aux_loss is not None and out.aux_loss.ndim == 0
    assert out.router_logits is None
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == 2  # one entry per MoE layer
    assert out.router_logits[0].shape == (2 * 10, 4)
    # the raw logits: exactly the router's linear map of the layer's normalised input
    layer = model.model.layers[0]
    hidden = model.model.embed_tokens(ids)
    attn_in = layer.input_layernorm(hidden)
    pos = model.model.rotary_emb(hidden, torch.arange(10)[None])
    attn, _ = layer.self_attn(attn_in, pos, attention_mask=None)
    mlp_in = layer.post_attention_layernorm(hidden + attn)
    torch.testing.assert_close(out.router_logits[0], mlp_in.reshape(-1, 32) @ layer.mlp.router.weight.T)


def test_loss_includes_router_losses_by_default():
    config = tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    model = MoeForCausalLM(config).eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    ce = model.loss_function(out.logits, ids, config.vocab_size)
    from modeling_moe.losses import router_z_loss

    aux = load_balancing_loss(out.router_logits, 4, 2, mask)
    z = router_z_loss(out.router_logits, mask)
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, ce + 0.5 * aux + 0.1 * z)
    # not only when router logits are requested (transformers' Mixtral drops them otherwise)
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=ids).loss, out.loss)


def test_left_padding_does_not_change_the_aux_loss():
    model = MoeForCausalLM(tiny_config()).eval()
    ids = _ids(1, 6)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    aux_plain = model(ids).aux_loss
    aux_padded = model(padded, attention_mask=mask).aux_loss
    torch.testing.assert_close(aux_padded, aux_plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["topk_softmax", "switch"])
def test_generate_with_and_without_cache_gives_the_same_tokens(router):
    k = 1 if router == "switch" else 2
    model = MoeForCausalLM(tiny_config(router_type=router, num_experts_per_tok=k, capacity_factor_eval=1.0)).eval()
    ids = _ids(2, 5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without_cache = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)


def test_generate_sampling_and_beam_search_run():
    model = MoeForCausalLM(tiny_config()).eval()
    ids = _ids(1, 4)
    sampled = model.generate(ids, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    beams = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert sampled.shape == (1, 8) and beams.shape == (1, 8)


def test_generation_is_dropless_by_default_and_restores_state():
    model = MoeForCausalLM(tiny_config(capacity_factor_eval=0.25)).eval()
    seen = []
    block = next(m for m in model.modules() if isinstance(m, MoeSparseBlock))
    block.register_forward_pre_hook(lambda mod, args: seen.append(mod.capacity_factor()))
    model.generate(_ids(1, 4), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert seen and all(c is None for c in seen)
    assert block.in_generation is False and block.capacity_factor() == 0.25


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config(router_z_loss_coef=0.01, router_aux_loss_coef=0.1)
    model = MoeForCausalLM(config).train()
    ids = _ids()

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert any("router" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_switch_training_drops_and_backward_runs():
    model = MoeForCausalLM(tiny_config(router_type="switch", num_experts_per_tok=1, capacity_factor_train=0.5)).train()
    ids = _ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype):
    model = MoeForCausalLM(tiny_config()).to(dtype).eval()
    out = model(_ids(), labels=_ids())
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)


def test_sdpa_and_eager_attention_agree():
    config = tiny_config(sliding_window=4)
    model = MoeForCausalLM(config).eval()
    ids = _ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("sdpa")
    sdpa = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(sdpa[mask.bool()], eager[mask.bool()], atol=1e-5, rtol=1e-4)


def test_biases_follow_the_config():
    qwen = MoeForCausalLM(tiny_config(qkv_bias=True)).model.layers[0].self_attn
    assert qwen.q_proj.bias is not None and qwen.v_proj.bias is not None and qwen.o_proj.bias is None
    llama = MoeForCausalLM(tiny_config(attention_bias=True, mlp_bias=True, moe_layers=[1])).model.layers[0]
    assert llama.self_attn.o_proj.bias is not None and llama.mlp.down_proj.bias is not None


def test_dense_and_moe_layers_alternate():
    model = MoeForCausalLM(tiny_config(num_hidden_layers=4, moe_layer_frequency=2))
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["MoeMLP", "MoeSparseBlock", "MoeMLP", "MoeSparseBlock"]
    assert model.model.layers[0].mlp.gate_proj.out_features == 64  # intermediate_size
    assert model.model.layers[1].mlp.experts.down_proj.shape == (4, 32, 48)  # moe_intermediate_size


def test_resize_token_embeddings_and_tied_embeddings():
    model = MoeForCausalLM(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.resize_token_embeddings(140)
    assert model.lm_head.weight.shape == (140, 32) and model.config.vocab_size == 140
    assert model(_ids(1, 4, vocab=140)).logits.shape == (1, 4, 140)


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("moe_lm", hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
    assert isinstance(config, MoeConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), MoeForCausalLM)
    assert isinstance(AutoModel.from_config(config), MoeModel)
    classifier = AutoModelForSequenceClassification.from_config(tiny_config(num_labels=3))
    assert isinstance(classifier, MoeForSequenceClassification)
    ids = _ids()
    out = classifier(ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


def test_save_and_reload_in_process(tmp_path):
    model = MoeForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for name in ("configuration_moe.py", "modeling_moe.py", "routing.py", "experts.py", "losses.py"):
        assert (tmp_path / name).exists(), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_reloaded_cpu_tensors_are_aligned_and_decode_bitwise(tmp_path, tied):
    """transformers keeps a memory-mapped checkpoint's tensors as views into the file, off cache-line boundaries;
    `from_pretrained` gives each its own 64-byte aligned copy (MKL's GEMV bits depend on alignment on some CPUs),
    keeping tied weights tied, so a one-token decode step reproduces the saved model bit for bit."""
    model = MoeForCausalLM(tiny_config(tie_word_embeddings=tied, mlp_bias=True)).eval()
    model.save_pretrained(tmp_path)
    reloaded = MoeForCausalLM.from_pretrained(tmp_path).eval()
    tensors = dict(reloaded.named_parameters()) | dict(reloaded.named_buffers())
    assert tensors and all(t.data_ptr() % 64 == 0 for t in tensors.values()), [
        n for n, t in tensors.items() if t.data_ptr() % 64
    ]
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids[:1, :1]).logits, model(ids[:1, :1]).logits)
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_device_map_auto_loads(tmp_path):
    pytest.importorskip("accelerate")
    MoeForCausalLM(tiny_config()).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model(_ids()).logits.shape == (2, 10, 128)


def test_bad_inputs_are_rejected():
    model = MoeForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model()
