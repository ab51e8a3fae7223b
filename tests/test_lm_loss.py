"""The chunked LM loss (`losses.linear_cross_entropy`, `config.lm_loss_chunk_size`) against torch's cross-entropy
on full logits and against the model's own standard loss path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from modeling_moe import MoeConfigError, MoeForCausalLM
from modeling_moe.losses import linear_cross_entropy
from tests.conftest import tiny_config


def _reference(hidden, weight, labels, num_items_in_batch=None):
    logits = F.linear(hidden, weight).float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("num_items_in_batch", [None, 123])
def test_matches_cross_entropy_on_full_logits_fp32(chunk_size, num_items_in_batch):
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = (torch.randn(37, 16) * 0.3).requires_grad_()
    labels = torch.randint(0, 37, (50,))
    labels[::6] = -100
    ref = _reference(hidden, weight, labels, num_items_in_batch)
    ref_grads = torch.autograd.grad(ref * 2.5, (hidden, weight))  # a non-unit upstream gradient
    out = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)
    grads = torch.autograd.grad(out * 2.5, (hidden, weight))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_bf16_and_autocast_follow_the_linear_layer_dtype():
    hidden = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(29, 16) * 0.3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 29, (40,))
    ref, out = _reference(hidden, weight, labels), linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)

    hidden32, weight32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(hidden32, weight32, labels)
        out = linear_cross_entropy(hidden32, weight32, labels, chunk_size=16)
    torch.testing.assert_close(out, ref)  # the same bf16 GEMM, so the same logits
    for got, want in zip(
        torch.autograd.grad(out, (hidden32, weight32)), torch.autograd.grad(ref, (hidden32, weight32))
    ):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_no_grad_and_frozen_inputs():
    hidden, weight = torch.randn(10, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (10,))
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(hidden, weight, labels, chunk_size=3), _reference(hidden, weight, labels)
        )
    weight.requires_grad_()  # only the weight trains (a frozen body)
    (grad_w,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, chunk_size=3), (weight,))
    torch.testing.assert_close(grad_w, torch.autograd.grad(_reference(hidden, weight, labels), (weight,))[0])


def test_every_label_ignored_gives_nan_like_torch():
    hidden, weight = torch.randn(4, 8), torch.randn(5, 8)
    labels = torch.full((4,), -100)
    assert math.isnan(linear_cross_entropy(hidden, weight, labels).item())
    assert math.isnan(_reference(hidden, weight, labels).item())


def test_bad_inputs_name_what_is_wrong():
    hidden, weight = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 5, 1, -100]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, -3, 1, 2]))
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match=r"labels .* must have the shape"):
        linear_cross_entropy(hidden, weight, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be \\(vocab, hidden\\)"):
        linear_cross_entropy(hidden, torch.randn(5, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(MoeConfigError, match="lm_loss_chunk_size must be an integer >= 1"):
        tiny_config(lm_loss_chunk_size=0)


def _pair(**overrides):
    standard = MoeForCausalLM(tiny_config(**overrides)).train()
    chunked = copy.deepcopy(standard)
    chunked.config.lm_loss_chunk_size = 5  # does not divide the 2 * 11 positions
    return standard, chunked


@pytest.mark.parametrize("tied", [False, True])
def test_model_training_loss_and_gradients_match_the_standard_path(tied):
    standard, chunked = _pair(tie_word_embeddings=tied, router_z_loss_coef=0.01)
    ids = torch.randint(3, 128, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    out_s = standard(input_ids=ids, attention_mask=mask, labels=labels)
    out_c = chunked(input_ids=ids, attention_mask=mask, labels=labels)
    assert out_c.logits is None and out_s.logits is not None
    torch.testing.assert_close(out_c.loss, out_s.loss)
    torch.testing.assert_close(out_c.aux_loss, out_s.aux_loss)
    out_s.loss.backward()
    out_c.loss.backward()
    for (name, p_s), p_c in zip(standard.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(p_c.grad, p_s.grad, msg=name)


def test_model_loss_kwargs_follow_transformers():
    standard, chunked = _pair()
    ids = torch.randint(3, 128, (2, 11))
    shift = torch.randint(3, 128, (2, 11))
    for kwargs in ({"num_items_in_batch": 7}, {"shift_labels": shift}, {"ignore_index": 5}):
        want = standard(input_ids=ids, labels=ids, **kwargs).loss
        torch.testing.assert_close(chunked(input_ids=ids, labels=ids, **kwargs).loss, want, msg=str(kwargs))


def test_logits_come_back_outside_training_or_with_a_wrapped_head():
    from peft import LoraConfig, get_peft_model

    _, chunked = _pair()
    ids = torch.randint(3, 128, (1, 6))
    assert chunked.eval()(input_ids=ids, labels=ids).logits.shape == (1, 6, 128)
    assert chunked.train()(input_ids=ids).logits.shape == (1, 6, 128)  # no labels: the caller wants logits
    assert chunked(input_ids=ids, logits_to_keep=2).logits.shape == (1, 2, 128)
    lora = get_peft_model(copy.deepcopy(chunked), LoraConfig(r=2, target_modules=["lm_head"])).train()
    out = lora(input_ids=ids, labels=ids)  # the LoRA head is not `lm_head.weight` alone: full logits
    assert out.logits.shape == (1, 6, 128)
    out.loss.backward()
    assert any(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


def test_trainer_step_with_the_chunked_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = MoeForCausalLM(tiny_config(lm_loss_chunk_size=8))
    ids = torch.randint(3, 128, (8, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    before = model.lm_head.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert not torch.equal(before, model.lm_head.weight)
    metrics = trainer.evaluate()  # eval mode: the standard path, with logits
    assert math.isfinite(metrics["eval_loss"])
