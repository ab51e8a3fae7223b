"""Malformed model inputs raise errors naming the argument and its shape; an all-ignored batch has loss 0 with
zero gradient; NaN / Inf router inputs never take capacity from other sequences nor move the router bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_moe import MoeForCausalLM
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoeForCausalLM(tiny_config()).eval()


IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])


VOCAB = r"must be token ids in \[0, vocab_size=128\)"
BAD_INPUTS = {
    "id_too_large": (dict(input_ids=torch.tensor([[5, 128]])), rf"input_ids \(shape \(1, 2\)\) {VOCAB}, got .*128"),
    "negative_id": (dict(input_ids=torch.tensor([[-1, 5]])), r"input_ids .* got values from -1 to 5"),
    "empty": (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), r"input_ids is empty .* = \(2, 0\)"),
    "1d_ids": (dict(input_ids=torch.tensor([5, 6])), r"shape \(batch, sequence\), got torch.int64 of shape \(2,\)"),
    "float_ids": (dict(input_ids=torch.ones(1, 3)), "input_ids must be integer token ids"),
    "embeds": (dict(inputs_embeds=torch.zeros(1, 3, 31)), r"hidden_size=32\), got \(1, 3, 31\)"),
    "long_mask": (
        dict(input_ids=IDS, attention_mask=torch.ones(2, 6)),
        r"attention_mask has shape \(2, 6\); without a cache it must match the input \(2, 4\)",
    ),
    "label_shape": (dict(input_ids=IDS, labels=IDS[:, :3]), r"labels has shape \(2, 3\); expected .* = \(2, 4\)"),
    "label_value": (dict(input_ids=IDS, labels=IDS + 200), rf"labels \(shape \(2, 4\)\) {VOCAB} or -100"),
    "positions": (
        dict(input_ids=IDS, position_ids=torch.arange(3)[None]),
        r"position_ids has shape \(1, 3\); expected \(1 or batch=2, 4\)",
    ),
    "negative_position": (dict(input_ids=IDS, position_ids=torch.arange(4)[None] - 1), "position_ids .* must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_malformed_inputs_name_the_argument_and_its_shape(model, case):
    inputs, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        model(**inputs)


def test_a_cached_step_takes_a_mask_covering_the_cache(model):
    with torch.no_grad():
        out = model(IDS, use_cache=True)
        step = model(IDS[:, :1], attention_mask=torch.ones(2, 5), past_key_values=out.past_key_values)
        with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 5\); expected \(batch=2"):
            model(IDS[:, :1], attention_mask=torch.ones(1, 5), past_key_values=step.past_key_values)
    assert step.logits.shape == (2, 1, 128)


@pytest.mark.parametrize("chunk", [None, 3])
def test_all_ignored_labels_give_zero_loss_and_zero_gradient(chunk):
    torch.manual_seed(0)
    model = MoeForCausalLM(tiny_config(router_aux_loss_coef=0.0, lm_loss_chunk_size=chunk)).train()
    labels = torch.full_like(IDS, -100)
    loss = model(IDS, labels=labels).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # otherwise the mean over the non-ignored next-token labels, as transformers computes it
    labels[0, 2:] = IDS[0, 2:]
    out = model.eval()(IDS, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("policy", ["drop", "priority", "next_choice"])
def test_nan_sequence_takes_no_capacity_from_a_clean_one(policy):
    torch.manual_seed(0)
    model = MoeForCausalLM(tiny_config(capacity_factor_eval=0.5, capacity_policy=policy)).eval()
    clean = model.model.embed_tokens(IDS[1:])  # (1, 4, D)
    batch = torch.cat([torch.full_like(clean, float("nan")), clean])
    with torch.no_grad():
        alone = model(inputs_embeds=clean, output_router_logits=True)
        both = model(inputs_embeds=batch, output_router_logits=True)
    torch.testing.assert_close(both.logits[1], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(both.dropped_tokens, alone.dropped_tokens)  # the NaN tokens are not counted as drops
    assert alone.dropped_tokens.sum() > 0  # capacity binds, so the test can fail


def test_nan_router_input_does_not_move_the_router_bias():
    torch.manual_seed(0)
    model = MoeForCausalLM(tiny_config(router_bias_update_rate=0.01)).train()
    clean = model.model.embed_tokens(IDS[1:]).detach()
    routers = [r for r in model.modules() if getattr(r, "load_counts", None) is not None]
    counts = []
    for embeds in (clean, torch.cat([clean, torch.full_like(clean, float("inf"))])):
        model(inputs_embeds=embeds)
        counts.append([r.load_counts.clone() for r in routers])
        for r in routers:
            r.load_counts.zero_()
    assert all(torch.equal(a, b) for a, b in zip(*counts)) and counts[0][0].sum() == 4 * 2
    all_nan = torch.full_like(clean, float("nan"))
    model(inputs_embeds=all_nan)
    model.update_router_biases()
    assert all(not r.e_score_correction_bias.any() for r in routers)
