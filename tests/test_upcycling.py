"""Sparse upcycling: function preservation per family, the init strategies' promises, streaming, errors, Hub round
trip. Dense models are tiny transformers Llama / Mistral / Qwen2 built locally (hidden <= 64, 2 layers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from modeling_moe import MoeForCausalLM
from modeling_moe.modeling_moe import MoeSparseBlock
from modeling_moe.routing import MoeRouter
from modeling_moe.upcycling import (
    DegenerateRouterWarning,
    DenseFFN,
    UpcyclingError,
    checkpoint,
    expert_init,
    router_init,
    streaming,
    upcycle,
)
from tests.conftest import tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 5e5},
)
FAMILIES = {
    # Llama with biases on q, k, v, o (attention_bias); mlp_bias is tested separately.
    "llama": lambda **kw: LlamaForCausalLM(LlamaConfig(**{**COMMON, "attention_bias": True, **kw})),
    # Mistral: sliding window on every layer, GQA, head_dim != hidden / heads.
    "mistral": lambda **kw: MistralForCausalLM(MistralConfig(**{**COMMON, "head_dim": 16, "sliding_window": 4, **kw})),
    # Qwen2: q/k/v bias, layer 0 full attention and layer 1 sliding (max_window_layers=1), tied embeddings.
    "qwen2": lambda **kw: Qwen2ForCausalLM(
        Qwen2Config(
            **{**COMMON, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
            tie_word_embeddings=True,
            **kw,
        )
    ),
}


@pytest.fixture(autouse=True)
def _quiet_degenerate():
    """Zero routers are degenerate on purpose in some tests; the warning has its own test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateRouterWarning)
        yield


def _dense(family: str, **kw):
    torch.manual_seed(0)
    model = FAMILIES[family](**kw).eval()
    with torch.no_grad():  # non-trivial biases and norms, so copying them is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _assert_same_logits(dense, moe) -> None:
    ids, mask = _ids()
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = dense(ids, attention_mask=attention_mask).logits
            got = moe(ids, attention_mask=attention_mask).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _routers(moe: MoeForCausalLM) -> list[MoeRouter]:
    return [m for m in moe.modules() if isinstance(m, MoeRouter)]


# ------------------------------------------------------------------------------------------ function preservation
@pytest.mark.parametrize("layers", ["all", "every_other"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_copy_init_preserves_logits_whatever_the_router(family, layers):
    dense = _dense(family)
    moe = upcycle(dense, num_experts=4, num_experts_per_tok=2, moe_layers=layers, router_std=3.0)
    assert moe.config.moe_layers == ([0, 1] if layers == "all" else [1])
    for name in ("rope_parameters", "rms_norm_eps", "head_dim", "sliding_window", "tie_word_embeddings"):
        assert getattr(moe.config, name) == getattr(dense.config, name, None), name
    if family == "qwen2":
        assert moe.config.layer_types == ["full_attention", "sliding_attention"] and moe.config.qkv_bias
    _assert_same_logits(dense, moe)
    # "whatever the router weights": redraw every router at a large scale, routing changes, logits do not
    ids, _ = _ids()
    with torch.no_grad():
        before = moe(ids, output_router_logits=True).router_indices[0][:, 0]
        for router in _routers(moe):
            router.weight.normal_(0.0, 10.0)
        after = moe(ids, output_router_logits=True).router_indices[0][:, 0]
    assert not torch.equal(before, after) and len(before.unique()) > 1
    _assert_same_logits(dense, moe)


def test_rope_scaling_and_norm_eps_are_carried_over():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    }
    dense = _dense("llama", rope_parameters=rope, rms_norm_eps=1e-3)
    moe = upcycle(dense, num_experts=4)
    assert moe.config.rope_parameters == dense.config.rope_parameters and moe.config.rms_norm_eps == 1e-3
    _assert_same_logits(dense, moe)


def test_dense_layers_stay_bitwise_identical():
    dense = _dense("llama")
    moe = upcycle(dense, num_experts=4, moe_layers=[1])
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(
            getattr(moe.model.layers[0].mlp, proj).weight, getattr(dense.model.layers[0].mlp, proj).weight
        )
    assert torch.equal(moe.model.layers[1].self_attn.q_proj.bias, dense.model.layers[1].self_attn.q_proj.bias)
    assert torch.equal(moe.model.layers[1].mlp.experts.gate_up_proj[3, :64], dense.model.layers[1].mlp.gate_proj.weight)


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # copied experts carry the dense biases
        dict(moe_layers=[1], noise_std=0.0),
        dict(shared_expert=True, shared_expert_weight=0.5),
        dict(shared_expert=True, shared_expert_weight=1.0),
    ],
)
def test_llama_mlp_bias_is_preserved(options):
    dense = _dense("llama", mlp_bias=True)
    moe = upcycle(dense, num_experts=4, router_std=3.0, **options)
    assert moe.config.mlp_bias and moe.config.attention_bias
    layer = options.get("moe_layers", [0])[0]
    experts = moe.model.layers[layer].mlp.experts
    dense_mlp = dense.model.layers[layer].mlp
    assert torch.equal(experts.gate_up_proj_bias[2, :64], dense_mlp.gate_proj.bias)
    if not options.get("shared_expert"):
        assert torch.equal(experts.down_proj_bias[2], dense_mlp.down_proj.bias)
    _assert_same_logits(dense, moe)


def test_llama_mlp_bias_neuron_split_is_exact_with_all_experts():
    dense = _dense("llama", mlp_bias=True)
    moe = upcycle(dense, num_experts=4, num_experts_per_tok=4, expert_init="neuron_split", router_init="zeros")
    _assert_same_logits(dense, moe)


@pytest.mark.parametrize("expert_init", ["copy", "neuron_split"])
def test_shared_expert_split_of_the_output_is_exact(expert_init):
    dense = _dense("mistral")
    k = 4 if expert_init == "neuron_split" else 2
    router = "zeros" if expert_init == "neuron_split" else "normal"
    moe = upcycle(
        dense,
        num_experts=4,
        num_experts_per_tok=k,
        expert_init=expert_init,
        router_init=router,
        shared_expert=True,
        shared_expert_weight=0.25,
    )
    _assert_same_logits(dense, moe)


@pytest.mark.parametrize("split_mode", ["random", "cluster"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_neuron_split_is_exact_with_all_experts_zero_router_and_down_scaled_by_E(family, split_mode):
    dense = _dense(family)
    E = 4
    moe = upcycle(
        dense,
        num_experts=E,
        num_experts_per_tok=E,
        expert_init="neuron_split",
        split_mode=split_mode,
        router_init="zeros",
    )
    assert moe.config.moe_intermediate_size == 64 // E
    _assert_same_logits(dense, moe)
    # the scale matters: without it each expert contributes 1/E of its share
    unscaled = upcycle(
        dense,
        num_experts=E,
        num_experts_per_tok=E,
        expert_init="neuron_split",
        router_init="zeros",
        split_down_scale=1.0,
    )
    ids, _ = _ids()
    with torch.no_grad():
        assert not torch.allclose(unscaled(ids).logits, dense(ids).logits, atol=1e-3)


def test_switch_upcycling_scales_the_dense_ffn_by_the_router_probability():
    """What holds for Switch (k = 1, weight = router probability p, not renormalised): every MoE layer computes
    exactly p_top1(x) * FFN(x) (= FFN(x) / E with a zero router). What does not: the logits are not the dense
    model's, since p < 1 unless the router is one-hot."""
    dense = _dense("llama")
    moe = upcycle(dense, num_experts=4, num_experts_per_tok=1, router_type="switch", router_std=1.0)
    assert moe.config.router_type == "switch" and not moe.config.resolved_norm_topk_prob
    x = torch.randn(2, 7, 32)
    for i in (0, 1):
        block: MoeSparseBlock = moe.model.layers[i].mlp
        with torch.no_grad():
            p = F.softmax(x @ block.router.weight.T, dim=-1).max(dim=-1, keepdim=True).values  # (B, S, 1)
            torch.testing.assert_close(block(x), p * dense.model.layers[i].mlp(x), atol=1e-6, rtol=1e-5)
            block.router.weight.zero_()
            torch.testing.assert_close(block(x), dense.model.layers[i].mlp(x) / 4, atol=1e-6, rtol=1e-5)
    ids, _ = _ids()
    with torch.no_grad():
        assert not torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-3)
    with pytest.raises(UpcyclingError, match="num_experts_per_tok must be 1"):
        upcycle(dense, num_experts=4, num_experts_per_tok=2, router_type="switch")
    with pytest.raises(UpcyclingError, match="router_type='soft' cannot be upcycled into"):
        upcycle(dense, num_experts=4, num_experts_per_tok=2, router_type="soft")


def test_noise_changes_experts_by_the_requested_scale():
    ffn = DenseFFN(torch.randn(64, 32) * 0.5, torch.randn(64, 32), torch.randn(32, 64) * 2)
    g = torch.Generator().manual_seed(0)
    noisy = expert_init.add_noise(expert_init.copy_experts(ffn, 4), ffn, 0.1, g)
    delta_gate = noisy.gate_up[:, :64] - ffn.gate
    delta_down = noisy.down - ffn.down
    assert abs(float(delta_gate.std()) - 0.1 * float(ffn.gate.std())) < 0.01
    assert abs(float(delta_down.std()) - 0.1 * float(ffn.down.std())) < 0.03
    assert not torch.allclose(noisy.gate_up[0], noisy.gate_up[1])  # independent per expert


# ------------------------------------------------------------------------------------------ expert init
def test_drop_upcycling_redraws_a_fraction_per_expert_from_the_dense_statistics():
    I, D, E, r = 256, 64, 4, 0.5
    g = torch.Generator().manual_seed(0)
    ffn = DenseFFN(torch.randn(I, D, generator=g) * 0.5 + 0.1, torch.randn(I, D, generator=g) * 0.2 - 0.3,
                   torch.randn(D, I, generator=g) * 0.8)  # fmt: skip
    experts = expert_init.drop_upcycle_experts(ffn, E, r, torch.Generator().manual_seed(1))
    subsets = []
    redrawn = {"gate": [], "up": [], "down": []}
    for e in range(E):
        gate, upw, down = experts.gate_up[e, :I], experts.gate_up[e, I:], experts.down[e]
        changed = ~(gate == ffn.gate).all(dim=1)
        assert int(changed.sum()) == round(r * I)  # exactly r * I neurons per expert
        # the same neurons in gate rows, up rows and down columns; every other neuron is the dense one
        assert torch.equal(changed, ~(upw == ffn.up).all(dim=1))
        assert torch.equal(changed, ~(down == ffn.down).all(dim=0))
        subsets.append(frozenset(torch.nonzero(changed).squeeze(1).tolist()))
        redrawn["gate"].append(gate[changed])
        redrawn["up"].append(upw[changed])
        redrawn["down"].append(down[:, changed])
    assert len(set(subsets)) == E  # a different subset per expert
    for name, dense_w in (("gate", ffn.gate), ("up", ffn.up), ("down", ffn.down)):
        values = torch.cat([v.reshape(-1) for v in redrawn[name]])
        assert abs(float(values.mean() - dense_w.mean())) < 0.02, name
        assert abs(float(values.std() / dense_w.std()) - 1) < 0.03, name
    same = expert_init.drop_upcycle_experts(ffn, E, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(same.gate_up, expert_init.copy_experts(ffn, E).gate_up)


def test_drop_upcycling_end_to_end_changes_the_function_and_is_seeded():
    dense = _dense("qwen2")
    a = upcycle(dense, num_experts=4, expert_init="drop_upcycling", drop_ratio=0.25, seed=3)
    b = upcycle(dense, num_experts=4, expert_init="drop_upcycling", drop_ratio=0.25, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ids, _ = _ids()
    with torch.no_grad():
        assert not torch.allclose(a(ids).logits, dense(ids).logits, atol=1e-4)


def test_neuron_split_random_partition():
    I, D, E = 64, 16, 4
    ffn = DenseFFN(torch.randn(I, D), torch.randn(I, D), torch.randn(D, I))
    parts = expert_init.neuron_partition(ffn, E, "random", torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [I // E] * E
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(I))  # disjoint and covering
    other = expert_init.neuron_partition(ffn, E, "random", torch.Generator().manual_seed(1))
    assert any(not torch.equal(a, b) for a, b in zip(parts, other))
    experts = expert_init.neuron_split_experts(ffn, E, "random", 4.0, torch.Generator().manual_seed(0))
    for e, p in enumerate(parts):  # expert e holds exactly its neurons; down scaled by E
        assert torch.equal(experts.gate_up[e, : I // E], ffn.gate[p])
        assert torch.equal(experts.gate_up[e, I // E :], ffn.up[p])
        torch.testing.assert_close(experts.down[e], 4.0 * ffn.down[:, p])


def test_neuron_split_cluster_recovers_planted_neuron_groups():
    I, D, E = 64, 16, 4
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(E, 2 * D, generator=g) * 3
    group = torch.randperm(I, generator=g) % E  # 16 neurons per planted group, shuffled
    rows = centers[group] + 0.05 * torch.randn(I, 2 * D, generator=g)
    ffn = DenseFFN(rows[:, :D], rows[:, D:], torch.randn(D, I, generator=g))
    parts = expert_init.neuron_partition(ffn, E, "cluster", torch.Generator().manual_seed(0))
    assert sorted(len(p) for p in parts) == [I // E] * E
    assert {frozenset(p.tolist()) for p in parts} == {
        frozenset(torch.nonzero(group == c).squeeze(1).tolist()) for c in range(E)
    }


def _clustered_hidden_states(E: int, D: int, per_cluster: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E well-separated clusters on top of a large shared offset (the mean direction real hidden states have)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(E, D, generator=torch.Generator().manual_seed(0)), dim=1) * 4
    offset = torch.full((D,), 3.0)
    labels = torch.arange(E).repeat_interleave(per_cluster)
    return offset + centers[labels] + 0.3 * torch.randn(E * per_cluster, D, generator=g), labels


# ------------------------------------------------------------------------------------------ router init
def test_hidden_state_router_sends_distinct_clusters_to_distinct_experts():
    E, D = 4, 32
    x, _ = _clustered_hidden_states(E, D, 50, seed=1)
    weight = router_init.hidden_state_router(x, E, torch.Generator().manual_seed(0))
    assert not router_init.degenerate_router_pairs(weight)
    router = MoeRouter(tiny_config(hidden_size=D, num_local_experts=E, num_experts_per_tok=1)).eval()
    with torch.no_grad():
        router.weight.copy_(weight)
        fresh, labels = _clustered_hidden_states(E, D, 30, seed=2)  # step 0, unseen tokens
        top1 = router(fresh)[2][:, 0]
    expert_of = [set(top1[labels == c].tolist()) for c in range(E)]
    assert all(len(s) == 1 for s in expert_of), expert_of  # each cluster goes to one expert
    assert len(set.union(*expert_of)) == E  # and distinct clusters to distinct experts
    torch.testing.assert_close(weight @ x.mean(0), torch.zeros(E), atol=1e-4, rtol=0)  # centred: mean gets 0 logits


def test_degenerate_router_warning():
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]).repeat(20, 1) + torch.tensor([0, 0, 5.0, 0])
    weight = router_init.hidden_state_router(x, 4, torch.Generator().manual_seed(0))  # 2 directions, 4 experts
    assert router_init.degenerate_router_pairs(weight)
    dense = _dense("llama")
    with pytest.warns(DegenerateRouterWarning, match="layer 0"):
        upcycle(dense, num_experts=4, router_init="zeros")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateRouterWarning)
        upcycle(dense, num_experts=4, router_init="normal")


@pytest.fixture(scope="module")
def tokenizer():
    from modeling_moe.corpus import stdlib_paragraphs
    from training.tokenizer import train_byte_level_bpe

    return train_byte_level_bpe(stdlib_paragraphs(max_chars=40_000), vocab_size=300)


def test_hidden_router_init_from_calibration_text(tokenizer):
    from modeling_moe.corpus import stdlib_paragraphs

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": 300})).eval()
    texts = stdlib_paragraphs(max_chars=20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateRouterWarning)
        moe = upcycle(dense, num_experts=4, router_init="hidden", calibration_texts=texts, tokenizer=tokenizer)
    ids = tokenizer(texts[0], return_tensors="pt")["input_ids"][:, :40]
    with torch.no_grad():
        out = moe(ids, output_router_logits=True)
        torch.testing.assert_close(out.logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    assert all(len(r[:, 0].unique()) >= 2 for r in out.router_indices)  # tokens spread over experts
    with pytest.raises(UpcyclingError, match="calibration_texts"):
        upcycle(dense, num_experts=4, router_init="hidden", tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------ streaming and files
def test_streams_sharded_safetensors_one_file_at_a_time(tmp_path, monkeypatch):
    dense = _dense("mistral")
    dense.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    shards = sorted((tmp_path / "dense").glob("*.safetensors"))
    assert len(shards) >= 3
    open_now, peak, opened = [0], [0], []
    real_open = checkpoint.safe_open

    class CountingOpen:
        def __init__(self, path, **kw):
            self.handle = real_open(path, **kw)
            opened.append(Path(path).name)

        def __enter__(self):
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])
            return self.handle.__enter__()

        def __exit__(self, *exc):
            open_now[0] -= 1
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(checkpoint, "safe_open", CountingOpen)
    moe = upcycle(tmp_path / "dense", num_experts=4, out_dir=tmp_path / "moe", router_std=3.0)
    assert peak[0] == 1 and set(opened) == {s.name for s in shards}
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    layer_shards = {
        n: {s for k, s in index["weight_map"].items() if k.startswith(f"model.layers.{n}.")} for n in (0, 1)
    }
    assert all(len(s) == 1 for s in layer_shards.values()) and layer_shards[0] != layer_shards[1]  # one per layer
    assert len(set(index["weight_map"].values())) == 3
    _assert_same_logits(dense, moe)


def _assert_no_output(path: Path) -> None:
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")], "temporary folder left"


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("unsupported", UpcyclingError, "unsupported architecture: model_type 'gpt2'"),
        ("missing_shard", FileNotFoundError, "missing shard"),
        ("pickle_only", UpcyclingError, "safetensors only"),
        ("k_gt_E", UpcyclingError, r"num_experts_per_tok \(5\) must be <= num_experts \(4\)"),
        ("layer_out_of_range", UpcyclingError, r"moe_layers entries must be layer indices in \[0, 1\]"),
        ("unknown_dense_field", UpcyclingError, "pretraining_tp"),
        ("split_indivisible", UpcyclingError, "num_experts must divide"),
        ("override_clash", UpcyclingError, r"config overrides \['hidden_size'\]"),
        ("noise_without_copy", UpcyclingError, "noise_std > 0 applies to expert_init='copy' only"),
    ],
)
def test_bad_input_raises_and_leaves_no_output(tmp_path, case, error, match):
    src = tmp_path / "dense"
    options = dict(num_experts=4)
    if case == "unsupported":
        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(src)
    elif case == "missing_shard":
        _dense("llama").save_pretrained(src, max_shard_size="20KB")
        sorted(src.glob("*.safetensors"))[1].unlink()
    elif case == "pickle_only":
        _dense("llama").config.save_pretrained(src)
        (src / "pytorch_model.bin").write_bytes(b"not loaded")
    elif case == "unknown_dense_field":
        _dense("llama", pretraining_tp=2).save_pretrained(src)
    else:
        _dense("llama").save_pretrained(src)
        options.update(
            dict(
                k_gt_E=dict(num_experts_per_tok=5),
                layer_out_of_range=dict(moe_layers=[0, 2]),
                split_indivisible=dict(num_experts=3, num_experts_per_tok=1, expert_init="neuron_split"),
                override_clash=dict(config_overrides={"hidden_size": 64}),
                noise_without_copy=dict(expert_init="drop_upcycling", noise_std=0.1),
            )[case]
        )
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        upcycle(src, out_dir=out, **options)
    _assert_no_output(out)


def test_unsupported_model_object_and_existing_output(tmp_path):
    with pytest.raises(UpcyclingError, match="model_type 'gpt2'"):
        upcycle(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)), num_experts=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    dense = _dense("llama")
    with pytest.raises(FileExistsError, match="overwrite"):
        upcycle(dense, num_experts=4, out_dir=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    upcycle(dense, num_experts=4, out_dir=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_a_failure_mid_write_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def boom(*_args, **_kw):
        raise OSError("disk full")

    monkeypatch.setattr(streaming, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        upcycle(_dense("llama"), num_experts=4, out_dir=out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_moe"] = None  # this environment cannot import the package
    import os
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != "{repo}"]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    ids = tokenizer(sys.argv[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.save({{"ids": ids, "logits": logits, "generated": generated}}, sys.argv[3])
    """
)


def test_hub_ready_folder_round_trips_through_trust_remote_code_in_a_fresh_process(tmp_path, tokenizer):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": 300}, attention_bias=True)).eval()
    dense.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    tokenizer.save_pretrained(tmp_path / "dense")
    out = tmp_path / "moe"
    moe = upcycle(tmp_path / "dense", num_experts=4, moe_layers="every_other", out_dir=out, base_model="me/tiny-llama")
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "README.md",
        "tokenizer.json",
        "model.safetensors.index.json",
    } <= files
    assert {"modeling_moe.py", "configuration_moe.py", "routing.py", "experts.py", "losses.py"} <= files
    assert not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moe.MoeForCausalLM"
    assert config["attention_bias"] and config["rope_parameters"]["rope_theta"] == 5e5 and config["moe_layers"] == [1]
    card = (out / "README.md").read_text()
    meta = card.split("---")[1]
    for line in ("base_model: me/tiny-llama", "- sparse-upcycling", "total_parameters:", "active_parameters:"):
        assert line in meta, line
    assert "Komatsuzaki" in card, card
    assert "\n# moe\n" in card, card  # titled after the output folder

    prompt = "Return the number of items in a container."
    script = tmp_path / "load.py"
    script.write_text(LOADER.format(repo=str(REPO_ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(script), str(out), prompt, str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(remote["ids"], tokenizer(prompt, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(remote["logits"], moe(remote["ids"]).logits)
        torch.testing.assert_close(remote["logits"], dense(remote["ids"]).logits, atol=1e-5, rtol=1e-5)
    expected = dense.generate(remote["ids"], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(remote["generated"], expected)


def test_cli(tmp_path, capsys):
    from training.upcycle import main

    _dense("qwen2").save_pretrained(tmp_path / "dense")
    argv = ["--dense", str(tmp_path / "dense"), "--out_dir", str(tmp_path / "moe"), "--num_experts", "4"]
    summary = main([*argv, "--moe_layers", "1", "--expert_init", "drop_upcycling", "--drop_ratio", "0.25"])
    assert summary["shards"] == 3 and summary["total_params"] > summary["active_params"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["moe_layers"] == [1]
    with pytest.raises(FileExistsError):
        main(argv)


def test_toy_experiment_smoke(tmp_path):
    from training.upcycle_toy_experiment import main

    args = ["--corpus_chars", "20000", "--vocab_size", "300", "--hidden_size", "32", "--intermediate_size", "64"]
    args += ["--num_layers", "1", "--num_heads", "2", "--seq_len", "16", "--batch_size", "2", "--dense_steps", "2"]
    args += ["--continue_steps", "2", "--eval_every", "2", "--eval_blocks", "2"]
    args += ["--threads", str(torch.get_num_threads())]  # main() sets the global thread count
    summary = main([*args, "--out_dir", str(tmp_path)])
    assert (tmp_path / "upcycle_toy.png").stat().st_size > 0
    assert json.loads((tmp_path / "upcycle_toy.json").read_text())["final_moe"] == summary["final_moe"]
    # upcycling preserved the function: the MoE starts at the dense model's eval loss
    assert summary["moe_loss_at_upcycling"] == pytest.approx(summary["dense_loss_at_upcycling"], abs=1e-5)
    assert [s for s, _ in summary["curves"]["moe"]] == [0, 2]
