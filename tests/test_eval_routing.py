"""Every routing statistic the harness reports, against hand counts on a model whose routing is set by hand.

The hand-routed model: attention and experts output zero (o_proj and down_proj are zero), so every layer's router
sees the normalised token embedding. Token ids 3, 4, 5 ("A", "B", "C") have one-hot embeddings, so each router's
logits for a token are a column of its weight, which the test writes: the routing of every token is known.
"""

from __future__ import annotations

import math

import pytest
import torch

from eval import routing as routing_lib
from eval.cost import parameter_report, reference_mixtral
from modeling_moe import MoeForCausalLM, count_parameters
from tests.conftest import tiny_config

A, B, C = 3, 4, 5
# router logits per MoE layer and token; top-2 sets: layer 0 A{0,1} B{2,3} C{1,0}; layer 1 A{1,2} B{0,2} C{1,0}
LOGITS = [
    {A: [2.0, 1.0, 0.0, -1.0], B: [0.0, 0.0, 3.0, 1.0], C: [1.0, 3.0, 0.0, 0.0]},
    {A: [0.0, 2.0, 1.0, -1.0], B: [3.0, 0.0, 2.0, -1.0], C: [1.0, 3.0, 0.0, 0.0]},
]
DOCS = [[A, B, C, A, A, B], [C, C, A]]  # A x4, B x2, C x3: 9 real tokens; the second row is padded in a batch
TOKENS = [t for doc in DOCS for t in doc]


def hand_routed_model(logits=LOGITS, **overrides) -> MoeForCausalLM:
    """A tiny MoE whose layer-l router gives token t exactly the logits `logits[l][t]` (see the module doc)."""
    config = tiny_config(vocab_size=300, **overrides)
    model = MoeForCausalLM(config).eval()
    D = config.hidden_size
    scale = 1.0 / math.sqrt(1.0 / D + config.rms_norm_eps)  # RMSNorm of a one-hot vector
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        for dim, token in enumerate((A, B, C)):
            model.model.embed_tokens.weight[token, dim] = 1.0
        for layer, table in zip(model.model.layers, logits):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.mlp.router.weight.zero_()
            for dim, token in enumerate((A, B, C)):
                layer.mlp.router.weight[:, dim] = torch.tensor(table[token]) / scale
    return model


def softmax(values: list[float]) -> list[float]:
    z = [math.exp(v) for v in values]
    return [v / sum(z) for v in z]


def top_k(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


def hand_counts(layer: int, k: int = 2) -> list[int]:
    counts = [0, 0, 0, 0]
    for t in TOKENS:
        for e in top_k(LOGITS[layer][t], k):
            counts[e] += 1
    return counts


class ToyTokenizer:
    """Just what the report needs from a tokenizer: `decode` of single ids."""

    def decode(self, ids):
        return {A: "A", B: " B", C: "C\n"}.get(ids[0], "?")


@pytest.fixture(scope="module")
def capture():
    torch.manual_seed(0)
    return routing_lib.collect_routing(hand_routed_model(), DOCS, max_length=8, batch_size=2, max_tokens=None)


def test_the_model_routes_as_set(capture):
    for layer in range(2):
        expected = torch.tensor([LOGITS[layer][t] for t in TOKENS])
        assert torch.allclose(capture.logits[layer], expected, atol=1e-5)
    assert capture.token_ids.tolist() == TOKENS
    assert capture.doc_ids.tolist() == [0] * 6 + [1] * 3


def test_load_cv_entropy_dead_experts(capture):
    summary = routing_lib.routing_summary(capture, ToyTokenizer())
    # by hand: layer 0 e0 = A4 + C3, e1 = A4 + C3, e2 = B2, e3 = B2; layer 1 e0 = B2 + C3, e1 = A4 + C3, e2 = A4 + B2
    assert hand_counts(0) == [7, 7, 2, 2] and hand_counts(1) == [5, 7, 6, 0]
    expected = {
        0: {"load": [7 / 18, 7 / 18, 2 / 18, 2 / 18], "cv": 2.5 / 4.5, "dead": []},
        1: {"load": [5 / 18, 7 / 18, 6 / 18, 0.0], "cv": math.sqrt((0.5**2 + 2.5**2 + 1.5**2 + 4.5**2) / 4) / 4.5},
    }
    expected[1]["dead"] = [3]
    for layer, stats in enumerate(summary["layers"]):
        assert stats["layer"] == layer
        assert stats["load"] == pytest.approx(expected[layer]["load"])
        assert stats["load_cv"] == pytest.approx(expected[layer]["cv"])
        p = [x for x in expected[layer]["load"] if x > 0]
        assert stats["load_entropy"] == pytest.approx(-sum(x * math.log(x) for x in p))
        assert stats["dead_experts"] == expected[layer]["dead"]
        assert stats["dropped_fraction"] == 0.0
    assert summary["num_tokens"] == 9


def test_confidence_and_router_entropy(capture):
    summary = routing_lib.routing_summary(capture, ToyTokenizer())
    for layer, stats in enumerate(summary["layers"]):
        probs = [sorted(softmax(LOGITS[layer][t]), reverse=True) for t in TOKENS]
        assert stats["top1_prob"] == pytest.approx(sum(p[0] for p in probs) / 9, rel=1e-5)
        assert stats["margin"] == pytest.approx(sum(p[0] - p[1] for p in probs) / 9, rel=1e-5)
        entropy = [-sum(x * math.log(x) for x in p) for p in probs]
        assert stats["router_entropy"] == pytest.approx(sum(entropy) / 9, rel=1e-5)


def test_consecutive_layer_agreement(capture):
    summary = routing_lib.routing_summary(capture, ToyTokenizer())
    # A: {0,1} vs {1,2} -> 1/2; B: {2,3} vs {0,2} -> 1/2; C: {0,1} vs {0,1} -> 1
    assert summary["consecutive_layer_agreement"] == pytest.approx([(4 * 0.5 + 2 * 0.5 + 3 * 1.0) / 9])


def test_top_tokens_table_and_passage(capture):
    summary = routing_lib.routing_summary(capture, ToyTokenizer(), top_n=8)
    table = summary["top_tokens"]
    as_counts = [
        [[(row["token_id"], row["count"], row["share"]) for row in expert] for expert in layer] for layer in table
    ]
    assert as_counts[0] == [
        [(A, 4, 1.0), (C, 3, 1.0)],
        [(A, 4, 1.0), (C, 3, 1.0)],
        [(B, 2, 1.0)],
        [(B, 2, 1.0)],
    ]
    assert as_counts[1] == [[(C, 3, 1.0), (B, 2, 1.0)], [(A, 4, 1.0), (C, 3, 1.0)], [(A, 4, 1.0), (B, 2, 1.0)], []]
    assert table[0][0][0]["token"] == "A" and table[0][2][0]["token"] == "␣B"  # whitespace made visible
    # passage = first document without its first (BOS) position: B C A A B; first choice = highest logit
    passage = summary["passage"]
    assert passage["tokens"] == [" B", "C\n", "A", "A", " B"]
    assert passage["first_choice"] == [[2, 1, 0, 0, 2], [0, 1, 1, 1, 0]]


def test_comparison_with_a_second_model(capture):
    other_logits = [dict(LOGITS[0]), LOGITS[1]]
    other_logits[0][A] = [-1.0, 1.0, 0.0, 2.0]  # A now picks {3, 1} in layer 0 instead of {0, 1}
    other = routing_lib.collect_routing(hand_routed_model(other_logits), DOCS, max_length=8, max_tokens=None)
    comparison = routing_lib.compare_routing(capture, other)
    assert comparison["topk_agreement"] == pytest.approx([(4 * 0.5 + 5 * 1.0) / 9, 1.0])
    p, q = softmax(LOGITS[0][A]), softmax(other_logits[0][A])
    kl_a = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert comparison["routing_kl"] == pytest.approx([4 * kl_a / 9, 0.0], abs=1e-6)


def test_drops_and_capacity_sweep_switch_model():
    # Switch routing (top-1): layer 0 A->0 (4 tokens), B->2 (2), C->1 (3); layer 1 A->1, B->0, C->1 (7 on e1)
    model = hand_routed_model(router_type="switch", num_experts_per_tok=1, capacity_factor_eval=1.0)
    assert routing_lib.has_capacity(model)
    cap = routing_lib.collect_routing(model, DOCS, max_length=8, batch_size=2, max_tokens=None)
    # one forward pass of 9 real tokens: capacity = ceil(9 * 1 * 1.0 / 4) = 3 per expert
    assert [s["dropped_fraction"] for s in cap.summary] == pytest.approx([1 / 9, 4 / 9])
    sweep = routing_lib.capacity_sweep(model, DOCS, max_length=8, factors=[1.0, 2.0], batch_size=2, max_tokens=None)
    # factor 2: capacity = ceil(18 / 4) = 5: layer 0 keeps all, layer 1 drops 7 - 5 = 2
    assert sweep["factors"] == [1.0, 2.0]
    assert sweep["dropped_fraction"] == [pytest.approx([1 / 9, 4 / 9]), pytest.approx([0.0, 2 / 9])]
    assert all(math.isfinite(x) for x in sweep["mean_nll"])
    assert [b.capacity_factor_eval for b in routing_lib.moe_blocks(model)] == [1.0, 1.0]  # restored
    choices = routing_lib.first_choice_experts(cap)
    assert (choices[1] == -1).sum() == 4  # dropped first choices are marked -1 (grey in the passage)


def test_routing_needs_an_moe_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match="routing analysis needs an MoE model"):
        routing_lib.collect_routing(dense, DOCS, max_length=8)


def test_cost_parameters_and_mixtral_reference():
    model = hand_routed_model()
    report = parameter_report(model)
    counts = count_parameters(model)
    assert report["total"] == counts.total and report["active_params"] == counts.active_params
    assert report["weight_memory_bytes"] == {"bf16": 2 * counts.total_params, "fp32": 4 * counts.total_params}
    reference, note = reference_mixtral(model)
    assert "same weights" in note
    ids = torch.tensor([DOCS[0]])
    with torch.no_grad():
        assert torch.allclose(reference(ids).logits, model(ids).logits, atol=1e-5)
    switch = hand_routed_model(router_type="switch", num_experts_per_tok=1, capacity_factor_eval=1.0)
    reference, note = reference_mixtral(switch)
    assert "same d=32, f=48, E=4, k=1" in note and "switch" in note
    assert reference.config.num_local_experts == 4 and reference.config.intermediate_size == 48
