"""transformers' own model-test conventions, checked against our classes with a tiny config.

transformers tests every model with `ModelTesterMixin` (tests/test_modeling_common.py), `GenerationTesterMixin`
(tests/generation/test_utils.py) and the causal-LM tester (tests/causal_lm_tester.py). Those files are not
installable and not ours, so each check that applies to a decoder-only MoE causal LM is written here in our own
code; the comment `# mirrors: <test name>` names the transformers test it follows. Every check runs on every
transformers release we support (CI runs this file on the oldest and the newest).

Where our model deliberately differs from transformers' convention, the test says so and checks our behaviour:
- `aux_loss` is always returned and the router losses are always in the training loss (Mixtral adds them only
  when router logits are requested).
- `past_key_values=` is accepted without a deprecation warning on 5.24 (transformers' models warn; ours must take
  it silently because these files also run under 5.23, whose `generate()` passes that name).
- Capacity limits make a token's output depend on the other tokens of its forward pass, so equivalences between
  differently batched/padded/cached runs are checked on the dropless configuration (the default, and what
  `generate()` uses).
"""

import copy
import functools
import inspect
import logging
import warnings
from typing import get_args

import pytest
import torch
import transformers
from accelerate.utils import compute_module_sizes
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import OutputRecorder

from modeling_moe import MoeForCausalLM, MoeForSequenceClassification, MoeModel
from modeling_moe import modeling_moe as modeling
from modeling_moe.modeling_moe import CACHE_NAME
from tests.conftest import tiny_config

ALL_CLASSES = (MoeModel, MoeForCausalLM, MoeForSequenceClassification)
B, S, NEW = 2, 7, 3  # batch, prompt length, new tokens
D, LAYERS, HEADS, KV_HEADS, VOCAB = 32, 2, 4, 2, 128
HEAD_DIM = D // HEADS


def _model(cls=MoeForCausalLM, attn="eager", **overrides):
    torch.manual_seed(0)
    model = cls(tiny_config(**overrides)).eval()
    model.set_attn_implementation(attn)
    return model


def _inputs(batch=B, seq=S, left_pad=True):
    """Token ids (never pad/bos/eos ids) and a 0/1 mask whose first row is left-padded by 2 when `left_pad`."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :2] = 0
        ids[0, :2] = 0
    return ids, mask


def _labels(cls, ids):
    if cls is MoeForCausalLM:
        return ids.clone()
    if cls is MoeForSequenceClassification:
        return torch.zeros(ids.shape[0], dtype=torch.long)
    return None


def _output_fields(cls) -> set[str]:
    """The dataclass fields of `cls.forward`'s return annotation, as transformers' tests read them."""
    return_type = cls.forward.__annotations__.get("return")
    return set().union(
        *(getattr(t, "__dataclass_fields__", {}).keys() for t in (get_args(return_type) or (return_type,)))
    )


def _recordable(model) -> set[str]:
    return set().union(
        *((m._can_record_outputs or {}).keys() for m in model.modules() if isinstance(m, PreTrainedModel))
    )


def _cache_of(output):
    """The cache a forward or `generate()` output carries, under the installed release's field name."""
    return getattr(output, CACHE_NAME)


def _gen(model, **kwargs):
    """`generate()` with fixed lengths (no eos stop) and the tester's logits processors (mirrors
    `GenerationTesterMixin._get_logits_processor_kwargs`)."""
    defaults = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, eos_token_id=None, do_sample=False)
    return model.generate(**{**defaults, **kwargs})


# --------------------------------------------------------------------------------------------------------------
# Output declaration and recording
# --------------------------------------------------------------------------------------------------------------


def test_forward_annotations_are_real_classes():
    """mirrors: test_moe_models_record_router_logits, test_output_router_logits_from_config (they read
    `forward.__annotations__["return"]`) and `_can_output_attn` of test_eager_matches_sdpa_inference (it reads the
    `**kwargs: Unpack[TransformersKwargs]` annotation). `from __future__ import annotations` would turn these into
    strings; the files whose forwards transformers inspects must not use it."""
    for cls in (MoeModel, MoeForCausalLM):
        return_type = cls.forward.__annotations__["return"]
        assert isinstance(return_type, type), f"{cls.__name__}.forward's return annotation is {return_type!r}"
        assert "router_logits" in _output_fields(cls)
        assert "aux_loss" in _output_fields(MoeForCausalLM)
    for cls in (MoeModel, MoeForCausalLM, modeling.MoeDecoderLayer, modeling.MoeAttention):
        kwargs_annotation = inspect.signature(cls.forward).parameters["kwargs"].annotation
        assert "output_attentions" in kwargs_annotation.__args__[0].__annotations__, cls.__name__
    # The sequence-classification head is transformers' generic one; it does not return router logits.
    assert MoeForSequenceClassification.forward.__annotations__["return"] in (
        SequenceClassifierOutputWithPast,
        "SequenceClassifierOutputWithPast",
    )
    assert "from __future__ import annotations" not in inspect.getsource(modeling)


def test_moe_models_record_router_logits():
    """mirrors: test_moe_models_record_router_logits (transformers skips it unless the modeling file itself
    contains `@use_experts_implementation`; ours keeps the experts in experts.py, so the check runs here)."""
    for cls in ALL_CLASSES:
        assert "router_logits" in _recordable(_model(cls))


def test_format_of_can_record_outputs():
    """mirrors: test_format_of_can_record_outputs."""
    for key, value in modeling.MoePreTrainedModel._can_record_outputs.items():
        assert isinstance(key, str)
        for recorder in value if isinstance(value, list) else [value]:
            assert isinstance(recorder, (str, type, OutputRecorder)), recorder


def test_output_router_logits_from_config():
    """mirrors: test_output_router_logits_from_config. Difference kept on purpose: `aux_loss` is returned whatever
    the flag says (Mixtral returns it only with router logits)."""
    ids, mask = _inputs()
    for cls in (MoeModel, MoeForCausalLM):
        model = _model(cls, output_router_logits=False)
        with torch.no_grad():
            explicit = model(ids, attention_mask=mask, output_router_logits=True)
            assert len(explicit.router_logits) == LAYERS
            assert not model(ids, attention_mask=mask).router_logits
            model.config.output_router_logits = True
            from_config = model(ids, attention_mask=mask)
            assert len(from_config.router_logits) == LAYERS
            assert not model(ids, attention_mask=mask, output_router_logits=False).router_logits
        for a, b in zip(explicit.router_logits, from_config.router_logits):
            torch.testing.assert_close(a, b)
        if cls is MoeForCausalLM:
            assert from_config.aux_loss is not None
            model.config.output_router_logits = False
            assert model(ids, attention_mask=mask).aux_loss is not None  # ours: always


def test_capture_outputs_nests_no_context():
    """mirrors: test_capture_outputs_decorator (only the outermost `capture_outputs` records; heads on the base
    model must not open a second recording context): hidden states and router logits are each recorded once."""
    ids, mask = _inputs()
    model = _model()
    out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True, output_router_logits=True)
    assert len(out.hidden_states) == LAYERS + 1
    assert len(out.attentions) == LAYERS
    assert len(out.router_logits) == LAYERS


def test_hidden_states_and_attentions_shapes():
    """mirrors: test_hidden_states_output, test_attention_outputs (eager attention returns the weights; counts are
    num_hidden_layers + 1 hidden states and num_hidden_layers attention maps; also via the config flags)."""
    ids, mask = _inputs()
    for cls in ALL_CLASSES:
        model = _model(cls)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
            model.config.output_hidden_states = True
            model.config.output_attentions = True
            from_config = model(ids, attention_mask=mask)
        for o in (out, from_config):
            assert len(o.hidden_states) == LAYERS + 1
            assert all(h.shape == (B, S, D) for h in o.hidden_states)
            assert len(o.attentions) == LAYERS
            assert all(a.shape == (B, HEADS, S, S) for a in o.attentions)
        # attention rows are distributions over the unmasked keys
        torch.testing.assert_close(out.attentions[0].sum(-1)[1], torch.ones(HEADS, S))
        assert torch.all(out.attentions[0][0, :, 2:, :2] == 0)  # real tokens give the left padding no weight
        if cls is MoeModel:
            torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)  # after the final norm
            assert not torch.equal(out.hidden_states[-2], out.last_hidden_state)


def test_can_capture_specific_layers_hidden_states():
    """mirrors: test_can_capture_specific_layers_hidden_states (where the installed release supports it: a list of
    indices in `output_hidden_states` keeps only those, the rest are None)."""
    ids, mask = _inputs()
    model = _model(MoeModel)
    full = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    try:
        picked = model(ids, attention_mask=mask, output_hidden_states=[0, 2]).hidden_states
    except (TypeError, ValueError) as error:  # a release without per-layer selection
        pytest.skip(f"transformers {transformers.__version__}: {error}")
    assert len(picked) == len(full)
    for i, h in enumerate(picked):
        if i in (0, 2):
            torch.testing.assert_close(h, full[i])
        else:
            assert h is None


def test_model_outputs_equivalence():
    """mirrors: test_model_outputs_equivalence (return_dict=False gives `to_tuple()` of the dict output)."""
    ids, mask = _inputs()

    def check(a, b):
        if isinstance(a, (list, tuple)):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                check(x, y)
        elif isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        else:
            assert type(a) is type(b)

    for cls in ALL_CLASSES:
        model = _model(cls)
        everything = {"output_hidden_states": True, "output_attentions": True, "output_router_logits": True}
        for extra, labels in (({}, None), (everything, _labels(cls, ids))):
            kwargs = dict(attention_mask=mask, **extra)
            if labels is not None:
                kwargs["labels"] = labels
            if cls is MoeForSequenceClassification:
                kwargs.pop("output_router_logits", None)
            with torch.no_grad():
                as_tuple = model(ids, return_dict=False, **kwargs)
                as_dict = model(ids, return_dict=True, **kwargs)
            assert isinstance(as_tuple, tuple) and isinstance(as_dict, ModelOutput)
            check(as_tuple, as_dict.to_tuple())


def test_inputs_embeds_match_input_ids():
    """mirrors: test_inputs_embeds, test_inputs_embeds_matches_input_ids."""
    ids, mask = _inputs()
    for cls in ALL_CLASSES:
        model = _model(cls)
        embeds = model.get_input_embeddings()(ids)
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask)[0]
            b = model(inputs_embeds=embeds, attention_mask=mask)[0]
        torch.testing.assert_close(a, b)
        with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
            model(input_ids=ids, inputs_embeds=embeds)


def test_cache_keyword_backward_compatibility():
    """mirrors: test_bc_cache_name_forward (the old keyword gives the same cache as the new one). Difference kept
    on purpose: no deprecation warning for `past_key_values=`, the only name transformers 5.23 passes."""
    ids, mask = _inputs()
    for cls in (MoeModel, MoeForCausalLM):
        model = _model(cls)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            old = model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config), use_cache=True)
            new = model(ids, attention_mask=mask, cache=DynamicCache(config=model.config), use_cache=True)
        assert "past_key_values" in type(old).__dataclass_fields__ or "cache" in type(old).__dataclass_fields__
        assert _cache_of(old).get_seq_length() == _cache_of(new).get_seq_length() == S
        for layer in range(LAYERS):
            torch.testing.assert_close(_cache_of(old).layers[layer].keys, _cache_of(new).layers[layer].keys)


def test_cache_format():
    """mirrors: test_past_key_values_format: one layer per decoder layer, keys/values (B, Hkv, S, head_dim)."""
    ids, mask = _inputs()
    out = _model()(ids, attention_mask=mask, use_cache=True)
    cache = _cache_of(out)
    assert isinstance(cache, DynamicCache)
    assert len(cache.layers) == LAYERS
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (B, KV_HEADS, S, HEAD_DIM)


# --------------------------------------------------------------------------------------------------------------
# Save / load, devices
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_safetensors_and_tied_weights(tmp_path, tie):
    """mirrors: test_save_load, test_can_use_safetensors, test_load_save_without_tied_weights, test_tied_weights_keys,
    test_model_weights_reload_no_missing_tied_weights, test_correct_missing_keys."""
    from safetensors.torch import load_file

    ids, mask = _inputs()
    model = _model(tie_word_embeddings=tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    saved = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in saved) == (not tie)  # a tied head is stored once
    reloaded, info = MoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys, no error messages
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tie
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    reloaded.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.eval()(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
    # every tied key names a real parameter (test_tied_weights_keys)
    params = dict(model.named_parameters(remove_duplicate=False))
    for target, source in MoeForCausalLM._tied_weights_keys.items():
        assert target in params and source in params
    # the base model loads the LM's weights through base_model_prefix (test_base_model_prefix_loads_base_weights)
    base, info = MoeModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info
    torch.testing.assert_close(base.embed_tokens.weight, model.model.embed_tokens.weight)


def test_no_split_modules_and_device_map(tmp_path):
    """mirrors: test_disk_offload_safetensors / test_cpu_offload on CPU (accelerate places whole `_no_split_modules`
    on CPU or disk; the offloaded model gives the same logits) and test_model_main_input_name /
    test_model_get_set_embeddings."""
    ids, mask = _inputs()
    model = _model()
    assert model.main_input_name == "input_ids"
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    assert all(any(type(m).__name__ == name for m in model.modules()) for name in model._no_split_modules)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    sizes = compute_module_sizes(model)
    size = (sizes[0] if isinstance(sizes, tuple) else sizes)[""]  # accelerate >= 1.x returns (sizes, ...)
    offloaded = MoeForCausalLM.from_pretrained(
        tmp_path, device_map="auto", max_memory={"cpu": int(0.6 * size)}, offload_folder=tmp_path / "offload"
    ).eval()
    offloaded.set_attn_implementation("eager")
    device_map = offloaded.hf_device_map
    assert set(device_map.values()) == {"cpu", "disk"}, device_map
    for name in device_map:  # no decoder layer split across devices
        assert not name.startswith("model.layers.") or name.count(".") == 2, name
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def test_training_with_and_without_labels():
    """mirrors: test_training (a head with labels returns a loss that backpropagates to every parameter) and the
    causal-LM tester's create_and_check_model (no labels: no loss)."""
    ids, mask = _inputs()
    for cls in (MoeForCausalLM, MoeForSequenceClassification):
        model = _model(cls).train()
        assert model(ids, attention_mask=mask).loss is None
        out = model(ids, attention_mask=mask, labels=_labels(cls, ids))
        out.loss.backward()
        assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_gradient_checkpointing_enable_disable():
    """mirrors: test_gradient_checkpointing_enable_disable, test_gradient_checkpointing_backward_compatibility."""
    for cls in ALL_CLASSES:
        model = cls(tiny_config())
        assert cls.supports_gradient_checkpointing and not model.is_activation_checkpointing
        assert any(isinstance(m, GradientCheckpointingLayer) for m in model.modules())
        model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing
        assert all(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing"))
        model.activation_checkpointing_disable()
        assert not model.is_activation_checkpointing
        assert not any(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing"))
        legacy = tiny_config()
        legacy.gradient_checkpointing = True  # the old config flag still turns it on
        assert cls(legacy).is_activation_checkpointing


@pytest.mark.parametrize("use_reentrant", [None, False])
def test_training_gradient_checkpointing(use_reentrant, caplog):
    """mirrors: test_training_gradient_checkpointing(_use_reentrant_false): same loss and gradients with and
    without checkpointing; with `use_cache=True` the checkpointed layers drop the cache under the keyword the
    installed release uses (`cache` on 5.24, `past_key_values` on 5.23) and say so."""
    ids, mask = _inputs()
    model = _model(router_z_loss_coef=0.01).train()
    reference = model(ids, attention_mask=mask, labels=ids)
    reference.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    transformers.logging.enable_propagation()
    logging.Logger.warning_once.cache_clear()  # transformers says it once per process
    with caplog.at_level(logging.WARNING, logger="transformers"):
        out = model(ids, attention_mask=mask, labels=ids, use_cache=True, cache=DynamicCache(config=model.config))
    out.loss.backward()
    torch.testing.assert_close(out.loss, reference.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)
    assert _cache_of(out).get_seq_length() == 0  # the layers never wrote it
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"`{CACHE_NAME}=None`" in m for m in messages), messages


def test_training_gradient_checkpointing_use_reentrant_true_is_refused():
    """mirrors: test_training_gradient_checkpointing_use_reentrant_true. Deliberate difference: reentrant
    checkpointing runs each layer's first forward under `no_grad`, so the router logits that the output recorder
    keeps carry no gradient and the router losses would silently train nothing (transformers' Mixtral has the same
    hole; its test only checks that some gradient exists). Our model refuses it with an error that names the fix."""
    ids, mask = _inputs()
    model = _model().train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="use_reentrant"):
        model(ids, attention_mask=mask, labels=ids)
    with torch.no_grad():  # no backward, nothing lost: evaluation still runs
        assert model(ids, attention_mask=mask, labels=ids).loss is not None


@pytest.mark.parametrize("tie", [False, True])
def test_resize_token_embeddings(tie):
    """mirrors: test_resize_tokens_embeddings, test_resize_embeddings_untied (vocab grows and shrinks, config and
    head follow, old rows are kept, the forward runs with new ids, ties are kept)."""
    model = _model(tie_word_embeddings=tie)
    old = model.get_input_embeddings().weight.clone()
    model.resize_token_embeddings(VOCAB + 10)
    assert model.config.vocab_size == VOCAB + 10
    assert model.get_input_embeddings().weight.shape == (VOCAB + 10, D)
    assert model.get_output_embeddings().weight.shape == (VOCAB + 10, D)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    torch.testing.assert_close(model.get_input_embeddings().weight[:VOCAB], old)
    ids = torch.tensor([[VOCAB + 9, 5, 6]])
    assert model(ids).logits.shape == (1, 3, VOCAB + 10)
    model.resize_token_embeddings(VOCAB - 8)
    assert model.config.vocab_size == VOCAB - 8 and model(ids[:, 1:]).logits.shape == (1, 2, VOCAB - 8)
    model.resize_token_embeddings(VOCAB, pad_to_multiple_of=64)
    assert model.get_input_embeddings().weight.shape[0] == 128


# --------------------------------------------------------------------------------------------------------------
# Attention implementations and padding
# --------------------------------------------------------------------------------------------------------------


def _flex_works() -> bool:
    """Flex attention runs on CPU only through torch.compile (inductor), which failed on the CPU machines this was
    written on (torch 2.13), after ~60 s of compiling; so it is tried only where CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        _model(attn="flex_attention").cuda()(torch.tensor([[3, 4, 5]], device="cuda"))
        return True
    except Exception:  # an install without a working compiler
        return False


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_eager_matches_other_attention(attn):
    """mirrors: test_eager_matches_sdpa_inference (fp32, padded batch, logits and hidden states), test_can_set_
    attention_dynamically, test_flex_attention_with_grads (flex only where it runs on this CPU)."""
    if attn == "flex_attention" and not _flex_works():
        pytest.skip("flex attention needs CUDA here (see _flex_works)")
    ids, mask = _inputs()
    model = _model()
    if attn == "flex_attention":
        model, ids, mask = model.cuda(), ids.cuda(), mask.cuda()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, output_hidden_states=True)
        model.set_attn_implementation(attn)
        assert model.config._attn_implementation == attn
        other = model(ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool()  # padded positions are undefined in either implementation
    torch.testing.assert_close(other.logits[keep], eager.logits[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(other.hidden_states[-1][keep], eager.hidden_states[-1][keep], atol=1e-4, rtol=1e-4)
    if attn == "flex_attention":
        model.train()
        model(ids, attention_mask=mask, labels=ids).loss.backward()


def test_left_padding_compatibility():
    """mirrors: test_left_padding_compatibility (the last token's logits do not change when the prompt is
    left-padded, with position ids from the mask as `generate()` builds them). Checked dropless: a capacity limit
    makes each token's experts depend on the batch."""
    ids, _ = _inputs(left_pad=False)
    model = _model()
    with torch.no_grad():
        plain = model(ids).logits[:, -1]
        pad = torch.zeros(B, 4, dtype=torch.long)
        padded_ids = torch.cat([pad, ids], 1)
        padded_mask = torch.cat([pad, torch.ones_like(ids)], 1)
        position_ids = (padded_mask.cumsum(-1) - 1).clamp(min=0)
        padded = model(padded_ids, attention_mask=padded_mask, position_ids=position_ids).logits[:, -1]
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


def test_padding_matches_padding_free_with_position_ids():
    """mirrors: test_sdpa_padding_matches_padding_free_with_position_ids (sequences packed into one row, told apart
    by position ids restarting at 0, give the padded batch's outputs). transformers' mask builders detect packing
    only without a mask and without a cache, hence `use_cache=False`. Dropless, as above."""
    ids, mask = _inputs()
    model = _model(attn="sdpa")
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits[mask.bool()]
        packed_ids = ids[mask.bool()][None]
        position_ids = torch.cat([torch.arange(int(n)) for n in mask.sum(1)])[None]
        packed = model(packed_ids, position_ids=position_ids, use_cache=False).logits[0]
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Causal-LM tester heads
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem_type", [None, "single_label_classification", "multi_label_classification"])
def test_sequence_classification_model(problem_type):
    """mirrors: test_sequence_classification_model(_for_single_label/_for_multi_label), test_problem_types. The
    causal-LM tester's token-classification and question-answering checks do not apply: we ship no such heads."""
    ids, _ = _inputs(left_pad=False)
    ids[0, -2:] = 0  # right padding: the head reads the last non-pad token
    config = tiny_config(num_labels=3, problem_type=problem_type)
    model = MoeForSequenceClassification(config).eval()
    labels = (
        torch.tensor([1, 2]) if problem_type != "multi_label_classification" else torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    )
    out = model(ids, attention_mask=ids.ne(0), labels=labels)
    assert out.logits.shape == (B, 3) and out.loss.ndim == 0
    hidden = model.model(ids, attention_mask=ids.ne(0)).last_hidden_state
    torch.testing.assert_close(out.logits[0], model.score(hidden[0, S - 3]))
    torch.testing.assert_close(out.logits[1], model.score(hidden[1, S - 1]))


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def _check_generate_outputs(out, model, num_sequences, prompt_len, use_cache, beams=False):
    """mirrors: GenerationTesterMixin._check_generate_outputs (scores, logits, attentions, hidden states and the
    cache of `return_dict_in_generate=True`, step by step)."""
    assert out.sequences.shape == (num_sequences, prompt_len + NEW)
    assert len(out.scores) == len(out.logits) == NEW
    assert all(s.shape == (num_sequences, VOCAB) for s in out.scores + out.logits)
    assert len(out.attentions) == len(out.hidden_states) == NEW
    for step, (attentions, hidden) in enumerate(zip(out.attentions, out.hidden_states)):
        keys = prompt_len + step
        query = keys if step == 0 or not use_cache else 1  # without a cache every step reruns the whole sequence
        assert len(attentions) == LAYERS and len(hidden) == LAYERS + 1
        assert all(a.shape == (num_sequences, HEADS, query, keys) for a in attentions), step
        assert all(h.shape == (num_sequences, query, D) for h in hidden), step
    cache = _cache_of(out)
    if not use_cache:
        assert cache is None
        return
    assert isinstance(cache, Cache) and len(cache.layers) == LAYERS
    assert cache.get_seq_length() == prompt_len + NEW - 1  # the last token is never fed back
    if not beams:
        assert cache.layers[0].keys.shape == (num_sequences, KV_HEADS, prompt_len + NEW - 1, HEAD_DIM)


@pytest.mark.parametrize("use_cache", [False, True])
def test_greedy_generate_dict_outputs(use_cache):
    """mirrors: test_greedy_generate, test_greedy_generate_dict_outputs(_use_cache); greedy tokens are the argmax of
    the returned logits, and cached equals uncached."""
    ids, mask = _inputs()
    model = _model()
    out = _gen(
        model,
        input_ids=ids,
        attention_mask=mask,
        use_cache=use_cache,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_attentions=True,
        output_hidden_states=True,
    )
    _check_generate_outputs(out, model, B, S, use_cache)
    assert torch.equal(out.sequences[:, S:], torch.stack(out.logits, 1).argmax(-1))
    assert torch.equal(out.sequences, _gen(model, input_ids=ids, attention_mask=mask, use_cache=not use_cache))


def test_sample_generate_dict_output():
    """mirrors: test_sample_generate, test_sample_generate_dict_output (num_return_sequences=2, seeded sampling is
    reproducible)."""
    ids, mask = _inputs()
    model = _model()
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        top_k=10,
        top_p=0.7,
        temperature=0.7,
        num_return_sequences=2,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_attentions=True,
        output_hidden_states=True,
    )
    torch.manual_seed(0)
    out = _gen(model, **kwargs)
    _check_generate_outputs(out, model, 2 * B, S, use_cache=True)
    torch.manual_seed(0)
    assert torch.equal(_gen(model, **kwargs).sequences, out.sequences)


@pytest.mark.parametrize("use_cache", [False, True])
def test_beam_search_generate_dict_output(use_cache):
    """mirrors: test_beam_search_generate, test_beam_search_generate_dict_output(s_use_cache), test_beam_sample_
    generate: num_beams > 1, with and without the cache, same sequences either way."""
    ids, mask = _inputs()
    model = _model()
    beam = dict(num_beams=2, num_return_sequences=2, length_penalty=2.0, early_stopping=False)
    out = _gen(
        model,
        input_ids=ids,
        attention_mask=mask,
        use_cache=use_cache,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_attentions=True,
        output_hidden_states=True,
        **beam,
    )
    assert out.sequences.shape == (2 * B, S + NEW)
    assert out.sequences_scores.shape == (2 * B,) and out.beam_indices.shape[0] == 2 * B
    assert len(out.scores) == len(out.logits) == len(out.attentions) == len(out.hidden_states) == NEW
    assert all(s.shape == (B * 2, VOCAB) for s in out.scores)
    assert (_cache_of(out) is not None) == use_cache
    other = _gen(model, input_ids=ids, attention_mask=mask, use_cache=not use_cache, **beam)
    assert torch.equal(out.sequences, other)
    torch.manual_seed(0)
    sampled = _gen(model, input_ids=ids, attention_mask=mask, do_sample=True, num_beams=2)
    assert sampled.shape == (B, S + NEW)


@pytest.mark.parametrize("assistant", ["prompt_lookup", "model"])
def test_assisted_decoding_matches_greedy_search(assistant):
    """mirrors: test_prompt_lookup_decoding_matches_greedy_search, test_assisted_decoding_matches_greedy_search,
    test_assisted_decoding_sample (candidate tokens verified in one forward, then the cache is cropped: the tokens
    and scores equal plain greedy decoding)."""
    ids, mask = _inputs(batch=1, left_pad=False)  # transformers' assisted decoding takes one sequence
    ids[:, -3:] = ids[:, 2:5].clone()  # a repeated n-gram, so prompt lookup proposes candidates
    model = _model()
    extra = {"prompt_lookup_num_tokens": 2} if assistant == "prompt_lookup" else {"assistant_model": _model()}
    kwargs = dict(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True)
    greedy = _gen(model, **kwargs)
    assisted = _gen(model, **kwargs, **extra)
    assert torch.equal(assisted.sequences, greedy.sequences)
    for a, b in zip(assisted.scores, greedy.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    assert _gen(model, input_ids=ids, attention_mask=mask, do_sample=True, **extra).shape == (1, S + NEW)


def test_generate_continue_from_past_key_values():
    """mirrors: test_generate_continue_from_past_key_values (the cache returned by one `generate()` continues the
    next; the result equals one longer uncached run)."""
    ids, mask = _inputs()
    model = _model()
    first = _gen(model, input_ids=ids, attention_mask=mask, return_dict_in_generate=True)
    cache = _cache_of(first)
    continued_mask = torch.cat([mask, torch.ones(B, NEW, dtype=mask.dtype)], 1)
    second = _gen(model, input_ids=first.sequences, attention_mask=continued_mask, **{CACHE_NAME: cache})
    whole = _gen(
        model, input_ids=ids, attention_mask=mask, max_new_tokens=2 * NEW, min_new_tokens=2 * NEW, use_cache=False
    )
    assert torch.equal(second, whole)
    assert cache.get_seq_length() == S + 2 * NEW - 1


def test_generate_continue_from_forward_cache():
    """mirrors: test_generate_continue_from_inputs_embeds and the cache hand-over of test_generate_continue_from_
    past_key_values: a cache filled by a plain forward call continues in `generate()`."""
    ids, mask = _inputs()
    model = _model()
    with torch.no_grad():
        out = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    continued = _gen(model, input_ids=ids, attention_mask=mask, **{CACHE_NAME: _cache_of(out)})
    assert torch.equal(continued, _gen(model, input_ids=ids, attention_mask=mask, use_cache=False))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_from_inputs_embeds(num_beams):
    """mirrors: test_generate_from_inputs_embeds (only new tokens are returned; same as from ids), with num_beams
    1 and 2, and test_generate_from_inputs_embeds_with_static_cache."""
    ids, mask = _inputs()
    model = _model()
    embeds = model.get_input_embeddings()(ids)
    kwargs = dict(attention_mask=mask, num_beams=num_beams)
    from_ids = _gen(model, input_ids=ids, **kwargs)
    from_embeds = _gen(model, inputs_embeds=embeds, **kwargs)
    assert torch.equal(from_embeds, from_ids[:, S:])
    assert torch.equal(_gen(model, input_ids=ids, inputs_embeds=embeds, **kwargs), from_ids)
    if num_beams == 1:
        static = _gen(model, inputs_embeds=embeds, cache_implementation="static", **kwargs)
        assert torch.equal(static, from_ids[:, S:])


def _offloaded_runs() -> bool:
    try:
        _gen(_model(), input_ids=torch.tensor([[3, 4, 5]]), cache_implementation="offloaded")
        return True
    except Exception:  # transformers' offloaded cache may need an accelerator
        return False


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static", "offloaded", "offloaded_static"])
def test_generate_with_cache_implementations(cache_implementation):
    """mirrors: test_generate_with_static_cache, test_offloaded_cache_implementation: every cache kind gives the
    uncached tokens and the cache class the release maps the name to."""
    if cache_implementation.startswith("offloaded") and not _offloaded_runs():
        pytest.skip("transformers' offloaded cache does not run on this machine")
    ids, mask = _inputs()
    model = _model()
    out = _gen(
        model,
        input_ids=ids,
        attention_mask=mask,
        cache_implementation=cache_implementation,
        return_dict_in_generate=True,
    )
    expected = _gen(model, input_ids=ids, attention_mask=mask, use_cache=False)
    assert torch.equal(out.sequences, expected)
    cache = _cache_of(out)
    assert isinstance(cache, StaticCache if "static" in cache_implementation else DynamicCache)
    # a user-built cache object works the same way
    if cache_implementation == "static":
        user_cache = StaticCache(config=model.config, max_cache_len=S + NEW)
        assert torch.equal(_gen(model, input_ids=ids, attention_mask=mask, **{CACHE_NAME: user_cache}), expected)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generate_sliding_window(cache_implementation):
    """mirrors: test_sliding_window_mask and the sliding-window cache checks of test_generate_with_static_cache:
    with `sliding_window` and mixed `layer_types`, generation runs past the window and cached tokens equal
    uncached; the sliding layers of the cache hold at most the window."""
    window = 4
    config = dict(sliding_window=window, layer_types=["sliding_attention", "full_attention"])
    ids, mask = _inputs()
    model = _model(**config)
    # the sliding layer's attention really is limited to the window (eager weights)
    attentions = model(ids, output_attentions=True).attentions
    assert torch.all(attentions[0][..., -1, : S - window] == 0) and torch.all(attentions[1][..., -1, :] > 0)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6)
    expected = _gen(model, use_cache=False, **kwargs)
    out = _gen(model, cache_implementation=cache_implementation, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, expected)
    cache = _cache_of(out)
    assert cache.layers[0].is_sliding and not cache.layers[1].is_sliding
    if cache_implementation == "dynamic":
        assert cache.layers[0].keys.shape[-2] <= window and cache.layers[1].keys.shape[-2] == S + 5


def test_generate_methods_with_logits_to_keep():
    """mirrors: test_generate_methods_with_logits_to_keep, test_assisted_decoding_with_logits_to_keep (`generate()`
    sets `logits_to_keep=1` because forward declares it; same tokens as with full logits)."""
    assert "logits_to_keep" in inspect.signature(MoeForCausalLM.forward).parameters
    ids, mask = _inputs()
    model = _model()
    assert model(ids, logits_to_keep=1).logits.shape == (B, 1, VOCAB)
    with_keep = _gen(model, input_ids=ids, attention_mask=mask)
    real = MoeForCausalLM.forward
    seen = []

    @functools.wraps(real)  # generate() reads forward's signature to decide on logits_to_keep
    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("logits_to_keep"))
        return real(self, *args, **kwargs)

    MoeForCausalLM.forward = spy
    try:
        _gen(model, input_ids=ids, attention_mask=mask)
    finally:
        MoeForCausalLM.forward = real
    assert seen and all(k == 1 for k in seen), seen
    without = _gen(model, input_ids=ids, attention_mask=mask, use_cache=False)
    assert torch.equal(with_keep, without)


def test_prepare_inputs_for_generation():
    """mirrors: test_prepare_inputs_for_generation_decoder_llm (transformers' own method, unchanged: it passes the
    cache under the installed release's name, keeps the mask, slices ids to the uncached part)."""
    assert MoeForCausalLM.prepare_inputs_for_generation is transformers.GenerationMixin.prepare_inputs_for_generation
    ids, mask = _inputs()
    model = _model()
    cache = _cache_of(model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True))
    signature = inspect.signature(model.prepare_inputs_for_generation).parameters
    kwargs = {CACHE_NAME: cache, "attention_mask": mask}
    if "next_sequence_length" in signature:  # 5.24 slices by the number of new tokens
        kwargs["next_sequence_length"] = 1
    else:  # 5.23 slices by cache_position
        kwargs["cache_position"] = torch.tensor([S - 1])
    inputs = model.prepare_inputs_for_generation(ids, **kwargs)
    assert torch.equal(inputs["input_ids"], ids[:, -1:])
    assert inputs[CACHE_NAME] is cache
    assert torch.equal(inputs["attention_mask"], mask)
    logits = model(**inputs).logits
    torch.testing.assert_close(logits[:, -1], model(ids, attention_mask=mask).logits[:, -1], atol=1e-5, rtol=1e-5)


def test_generation_config_and_no_deprecation_warnings(caplog):
    """mirrors: GenerationTesterMixin's warning checks: generate() on our model raises no FutureWarning /
    DeprecationWarning and transformers logs nothing about a deprecated `past_key_values` or `cache_position`."""
    ids, mask = _inputs()
    model = _model(attn="sdpa")
    assert isinstance(model.generation_config, GenerationConfig)
    transformers.logging.enable_propagation()
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        _gen(model, input_ids=ids, attention_mask=mask)
        _gen(model, input_ids=ids, attention_mask=mask, num_beams=2)
        _gen(model, input_ids=ids, attention_mask=mask, cache_implementation="static")
        model(ids, attention_mask=mask, use_cache=True, labels=ids)
        copy.deepcopy(model).train()(ids, attention_mask=mask, labels=ids).loss.backward()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "deprecat" in m.lower() or "cache_position" in m], messages
