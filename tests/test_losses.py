"""Router losses against formulas written here."""

from __future__ import annotations

import pytest
import torch

from modeling_moe.losses import load_balancing_loss, router_z_loss


@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_loss_is_k_for_uniform_router_probabilities(k):
    logits = torch.zeros(10, 6)  # uniform probabilities; topk ties pick the first k experts
    assert load_balancing_loss([logits, logits], num_experts=6, top_k=k).item() == pytest.approx(k)


def test_aux_loss_matches_the_switch_formula():
    logits = torch.randn(12, 4)
    probs = torch.softmax(logits, -1)
    top1 = probs.argmax(-1)
    f = torch.bincount(top1, minlength=4).float() / 12
    P = probs.mean(0)
    expected = 4 * (f * P).sum()
    torch.testing.assert_close(load_balancing_loss([logits], 4, 1), expected)


def test_aux_loss_matches_transformers_mixtral_function():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = tuple(torch.randn(2 * 7, 8) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    for m in (None, mask):
        torch.testing.assert_close(load_balancing_loss(logits, 8, 2, m), load_balancing_loss_func(logits, 8, 2, m))


def test_padding_does_not_change_the_aux_or_z_loss():
    real = torch.randn(5, 4)
    padded = torch.cat([torch.randn(3, 4) * 10, real])  # 3 padding rows, then the real tokens
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(load_balancing_loss([padded], 4, 2, mask), load_balancing_loss([real], 4, 2))
    torch.testing.assert_close(router_z_loss([padded], mask), router_z_loss([real]))


def test_z_loss_formula():
    logits = torch.randn(6, 5)
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(router_z_loss([logits, logits]), expected)


def test_mask_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="attention_mask"):
        load_balancing_loss([torch.randn(6, 4)], 4, 2, torch.ones(1, 5))


def test_no_moe_layers_gives_zero():
    assert load_balancing_loss([], 4, 2).item() == 0.0
    assert router_z_loss([]).item() == 0.0
