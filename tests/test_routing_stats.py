"""Routing statistics against hand counts."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_moe import routing_stats as rs


def test_counts_fractions_cv_entropy_dead():
    # 4 tokens, k = 2, 4 experts; sentinel 4 = dropped. Token 3 is padding.
    indices = torch.tensor([[0, 1], [0, 4], [2, 0], [3, 3]])
    mask = torch.tensor([True, True, True, False])
    counts = rs.expert_counts(indices, 4, mask)
    assert counts.tolist() == [3.0, 1.0, 1.0, 0.0]  # e0: t0, t1, t2; e1: t0; e2: t2; e3 only from padding
    assert rs.load_fractions(counts).tolist() == [0.6, 0.2, 0.2, 0.0]
    # mean 1.25; deviations 1.75, -0.25, -0.25, -1.25; population variance (3.0625+0.0625+0.0625+1.5625)/4 = 1.1875
    assert rs.load_cv(counts) == pytest.approx(math.sqrt(1.1875) / 1.25)
    assert rs.load_entropy(counts) == pytest.approx(-(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2)))
    assert rs.dead_experts(counts) == [3]
    assert rs.load_cv(torch.tensor([2.0, 2.0])) == 0.0


def test_router_entropy_confidence_kl():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert rs.router_entropy(logits) == pytest.approx((h0 + math.log(3)) / 2)
    assert rs.router_entropy(logits, torch.tensor([True, False])) == pytest.approx(h0)
    conf = rs.router_confidence(logits)
    assert conf["top1_prob"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert conf["margin"] == pytest.approx((0.25 + 0.0) / 2)
    q = torch.log(torch.tensor([[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    # KL(p||q) token 0: 0.5 log 2 + 0.25 log 0.5 + 0 = 0.25 log 2; token 1: 0
    assert rs.routing_kl(logits, q) == pytest.approx(0.25 * math.log(2) / 2)


def test_agreement_and_drops():
    a = torch.tensor([[0, 1], [2, 3], [1, 4]])
    b = torch.tensor([[1, 0], [2, 0], [1, 2]])
    # token 0: {0,1} vs {0,1} -> 1; token 1: {2,3} vs {0,2} -> 1/2; token 2: {1} vs {1,2} -> 1
    assert rs.topk_agreement(a, b, 4) == pytest.approx((1 + 0.5 + 1) / 3)
    assert rs.consecutive_layer_agreement([a, b, b], 4) == pytest.approx([2.5 / 3, 1.0])
    assert rs.dropped_fraction(3, 10, 2) == 0.15


@pytest.mark.parametrize("router_type", ["expert_choice", "topk_softmax"])
def test_accumulator_drop_fraction_means_what_the_router_drops(router_type):
    """Token choice with capacity drops assignments (over T*k); expert choice leaves tokens unchosen (over T)."""
    from modeling_moe import MoeForCausalLM
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = MoeForCausalLM(tiny_config(router_type=router_type, capacity_factor_eval=0.5)).eval()
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    acc = rs.RoutingAccumulator.for_config(model.config)
    acc.update(out)
    E = model.config.num_local_experts
    expected = []
    for layer, summary in enumerate(acc.summary()):
        indices = out.router_indices[layer]
        if router_type == "expert_choice":  # (T, E) with E where the expert did not take the token
            expected.append(float((indices == E).all(dim=-1).float().mean()))
        else:
            expected.append(float((indices == E).float().mean()))  # of the T*k assignments
        assert summary["dropped_fraction"] == pytest.approx(expected[-1])
    assert max(expected) > 0, "this case is meant to drop"
