"""transformers' experts interface (`@use_experts_implementation`) on this repository's model.

The checks mirror what transformers' common model tests ask of a model whose experts class carries the decorator
(`tests/test_modeling_common.py`: `_test_eager_matches_batched_and_grouped_inference`, run by every model test as
`test_eager_matches_batched_and_grouped_inference`): the model reports `_can_set_experts_implementation()`;
`set_experts_implementation(X)` sets `config._experts_implementation` to X and routes the experts through the
registered function of that name (and eager through none of them); every implementation gives eager's outputs on
the same weights, after a save/load round trip. Added here: gradients, `from_pretrained(experts_implementation=)`,
what `save_pretrained` writes, unknown names, and `MoePreTrainedModel.get_correct_experts_implementation`'s refusals.
"""

from __future__ import annotations

import json
import os
from unittest.mock import Mock, patch

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import modeling_moe.experts as experts_module
from modeling_moe import MoeForCausalLM
from modeling_moe.experts import OUR_EXPERTS_IMPLEMENTATIONS, MoeExperts
from tests.conftest import tiny_config

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

CUDA_TRITON = HAS_TRITON and torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# transformers' implementations that run on any device (deepgemm / sonicmoe need CUDA kernels from the Hub)
TRANSFORMERS_CPU_IMPLEMENTATIONS = ("batched_mm", "grouped_mm")
needs_cuda_triton = pytest.mark.skipif(not CUDA_TRITON, reason="moe_triton needs triton and a CUDA device")
ALTERNATIVES = [
    "moe_grouped",
    pytest.param("moe_triton", marks=needs_cuda_triton),
    *TRANSFORMERS_CPU_IMPLEMENTATIONS,
]
REGISTERED = ("moe_grouped", *TRANSFORMERS_CPU_IMPLEMENTATIONS) + (("moe_triton",) if HAS_TRITON else ())


def _model(**overrides) -> MoeForCausalLM:
    return MoeForCausalLM(tiny_config(**overrides)).to(DEVICE).eval()


def _inputs(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _experts_modules(model) -> list[MoeExperts]:
    found = [m for m in model.modules() if isinstance(m, MoeExperts)]
    assert found, "the tiny model has no MoeExperts"
    return found


def _assert_impl(model, name: str) -> None:
    assert model.config._experts_implementation == name
    assert model.get_experts_implementation() == {"": name}
    for experts in _experts_modules(model):  # what the decorated forward dispatches on
        assert experts.config._experts_implementation == name


@pytest.fixture
def spies():
    """Every registered implementation and this repository's eager `experts_forward`, wrapped in mocks."""
    mocks = {name: Mock(wraps=ALL_EXPERTS_FUNCTIONS[name]) for name in REGISTERED}
    eager = Mock(wraps=experts_module.experts_forward)
    with (
        patch.dict(ALL_EXPERTS_FUNCTIONS._global_mapping, mocks),
        patch.object(experts_module, "experts_forward", eager),
    ):
        mocks["eager"] = eager
        yield mocks


def _only_called(spies, name: str) -> None:
    called = sorted(n for n, m in spies.items() if m.called)
    assert called == [name], f"expected only {name!r} to run, ran {called}"
    for m in spies.values():
        m.reset_mock()


def test_can_set_experts_implementation():
    assert MoeForCausalLM._can_set_experts_implementation() is True
    assert "moe_grouped" in ALL_EXPERTS_FUNCTIONS
    assert set(OUR_EXPERTS_IMPLEMENTATIONS) == {"eager", "moe_grouped", "moe_triton"}


def test_default_is_eager():
    # transformers' default would be "grouped_mm"; this model defaults to its own exact path
    _assert_impl(_model(), "eager")


@pytest.mark.parametrize("seq", [2, 7], ids=["few_tokens", "grouped"])
@pytest.mark.parametrize("impl", ALTERNATIVES)
def test_eager_matches_implementation_inference(tmp_path, spies, impl, seq):
    """transformers' `_test_eager_matches_batched_and_grouped_inference` (float32): save/load, then eager and
    `impl` on the same weights give the same logits, and each dispatches to its own function only.
    seq=2 (batch 2, top-2: 8 assignments) takes eager's few-token path, seq=7 its grouped path."""
    model = _model()
    model.save_pretrained(tmp_path)
    model = MoeForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    ids = _inputs(seq=seq)
    with torch.no_grad():
        model.set_experts_implementation("eager")
        _assert_impl(model, "eager")
        ref = model(ids).logits
        _only_called(spies, "eager")

        model.set_experts_implementation(impl)
        _assert_impl(model, impl)
        out = model(ids).logits
        _only_called(spies, impl)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ALTERNATIVES)
def test_eager_matches_implementation_training(impl):
    """Loss and every parameter gradient match eager's (dropless training, no capacity factor)."""
    ids = _inputs()
    results = {}
    for name in ("eager", impl):
        torch.manual_seed(0)
        model = _model().train()
        model.set_experts_implementation(name)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.loss.detach(), out.logits.detach(), grads)
    (loss_ref, logits_ref, grads_ref), (loss, logits, grads) = results["eager"], results[impl]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert any(".experts.gate_up_proj" in n for n in grads_ref)
    assert grads.keys() == grads_ref.keys()
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-5, msg=f"gradient of {n}")


def test_bf16_moe_grouped_matches_eager():
    model = _model().to(torch.bfloat16)
    ids = _inputs(seq=3)  # 12 assignments: eager takes the grouped path, moe_grouped forces it
    few = _inputs(seq=1)  # 2 assignments: eager takes the few-token path
    with torch.no_grad():
        ref, ref_few = model(ids).logits, model(few).logits
        model.set_experts_implementation("moe_grouped")
        out, out_few = model(ids).logits, model(few).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    # both paths run the same bf16 GEMMs and sum the k weighted expert outputs in float32, rounding once per token
    torch.testing.assert_close(out_few, ref_few)


@pytest.mark.parametrize("impl", ALTERNATIVES)
def test_from_pretrained_experts_implementation(tmp_path, spies, impl):
    model = _model()
    ids = _inputs()
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    spies["eager"].reset_mock()
    loaded = MoeForCausalLM.from_pretrained(tmp_path, experts_implementation=impl).to(DEVICE).eval()
    _assert_impl(loaded, impl)
    with torch.no_grad():
        out = loaded(ids).logits
    _only_called(spies, impl)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["moe_grouped", "batched_mm"])
def test_save_pretrained_does_not_store_the_implementation(tmp_path, impl):
    """transformers drops `_experts_implementation_internal` from config.json: the choice is per load, and a
    reload without `experts_implementation=` gets this model's default again."""
    model = _model()
    model.set_experts_implementation(impl)
    model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        saved = json.load(f)
    assert not [k for k in saved if "experts_implementation" in k], saved
    assert impl not in json.dumps(saved)
    _assert_impl(model, impl)  # saving does not reset the live model
    _assert_impl(MoeForCausalLM.from_pretrained(tmp_path), "eager")


def test_switch_at_runtime_and_back(spies):
    model = _model()
    ids = _inputs()
    with torch.no_grad():
        ref = model(ids).logits
        _only_called(spies, "eager")
        for impl in ("batched_mm", "moe_grouped", "grouped_mm", "eager"):
            model.set_experts_implementation(impl)
            _assert_impl(model, impl)
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
            _only_called(spies, impl)


def test_unknown_implementation_raises_and_names_the_choices():
    model = _model()
    model.set_experts_implementation("moe_grouped")
    with pytest.raises(ValueError, match="not_an_implementation") as info:
        model.set_experts_implementation("not_an_implementation")
    for name in ("eager", "moe_grouped", "batched_mm", "grouped_mm"):
        assert f'"{name}"' in str(info.value)
    _assert_impl(model, "moe_grouped")  # unchanged
    with pytest.raises(ValueError, match="not_an_implementation"):
        MoeForCausalLM(tiny_config(experts_implementation="not_an_implementation"))


REFUSING_CONFIGS = {
    "mlp_bias": dict(mlp_bias=True),
    "capacity_eval": dict(capacity_factor_eval=1.0),
    "capacity_train": dict(capacity_factor_train=1.25),
    "expert_choice": dict(router_type="expert_choice"),
}


@pytest.mark.parametrize("impl", TRANSFORMERS_CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("overrides", REFUSING_CONFIGS.values(), ids=REFUSING_CONFIGS.keys())
def test_inexact_transformers_implementations_are_refused(tmp_path, impl, overrides):
    """transformers' implementations neither skip dropped assignments (index E) nor add `mlp_bias` expert biases:
    refused at runtime, at construction and at load, leaving the model on its implementation."""
    model = _model(**overrides)
    with pytest.raises(ValueError, match=impl):
        model.set_experts_implementation(impl)
    _assert_impl(model, "eager")
    with pytest.raises(ValueError, match=impl):
        MoeForCausalLM(tiny_config(experts_implementation=impl, **overrides))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=impl):
        MoeForCausalLM.from_pretrained(tmp_path, experts_implementation=impl)


@pytest.mark.parametrize("overrides", REFUSING_CONFIGS.values(), ids=REFUSING_CONFIGS.keys())
def test_moe_grouped_exact_with_drops_and_biases(overrides):
    """Our implementations are accepted where transformers' are refused, and match eager there."""
    torch.manual_seed(0)
    model = _model(**overrides)
    if overrides.get("mlp_bias"):
        with torch.no_grad():
            for experts in _experts_modules(model):
                experts.gate_up_proj_bias.normal_()
                experts.down_proj_bias.normal_()
    if "capacity_factor_train" in overrides:
        model.train()
    ids = _inputs(seq=9)
    with torch.no_grad():
        ref = model(ids)
        model.set_experts_implementation("moe_grouped")
        _assert_impl(model, "moe_grouped")
        out = model(ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
