"""One code base on every transformers release we allow (issue 13).

transformers 5.24 renamed the KV cache argument and output field `past_key_values` -> `cache` (generate() passes
`cache=` and reads `outputs.cache`); 5.23 uses `past_key_values`. The portable modeling file reads the installed
release's convention once (`CACHE_NAME`) and accepts both names from callers. These tests run under whichever
release is installed; `scripts/test.sh` runs them under the oldest allowed release and the newest.

`MOE_COMPAT_PYTHONS` (a `os.pathsep`-separated list of interpreters with another transformers release, set by
`scripts/test.sh`) makes the fresh-process test also load the saved folder under each of those releases.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from modeling_moe import MoeForCausalLM, upcycle
from modeling_moe import modeling_moe as mm
from modeling_moe.convert import from_mixtral
from tests.conftest import tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TRANSFORMERS = Version(transformers.__version__)
GREEDY = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)


def _ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _cache_of(output) -> DynamicCache:
    return getattr(output, mm.CACHE_NAME)


@pytest.fixture
def deprecation_messages():
    """Everything transformers says about deprecated names while the test runs: FutureWarnings and the
    `logger.warning_once` lines (whose once-cache is cleared first, so an earlier test cannot hide one)."""
    logging.Logger.warning_once.cache_clear()
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records
    logger.removeHandler(handler)
    records.extend(str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning)))
    records[:] = [r for r in records if "deprecat" in r.lower() or "past_key_values" in r]


def test_cache_name_is_the_installed_releases():
    assert mm.CACHE_NAME == ("cache" if TRANSFORMERS >= Version("5.24.0.dev0") else "past_key_values")
    assert mm.CACHE_NAME in transformers.modeling_outputs.MoeModelOutputWithPast.__dataclass_fields__


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_continues_from_a_cache_passed_under_either_name(name):
    model = MoeForCausalLM(tiny_config()).eval()
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :-2], use_cache=True)
        cache = _cache_of(prefix)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == ids.shape[1] - 2
        step = model(ids[:, -2:], use_cache=True, **{name: cache})
    assert _cache_of(step) is cache and cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(step.logits, full[:, -2:], atol=1e-5, rtol=1e-5)


def test_two_caches_or_a_cache_under_an_unknown_name_are_refused():
    model = MoeForCausalLM(tiny_config()).eval()
    ids = _ids()
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))
    # a future release that passed the cache under yet another name must not decode without it
    with pytest.raises(TypeError, match=r"cache_params=.*transformers " + transformers.__version__):
        model(ids, cache_params=DynamicCache(config=model.config))


def test_an_unknown_calling_convention_fails_loudly_at_import(monkeypatch):
    def create_causal_mask(config, inputs_embeds, attention_mask, kv_state, position_ids=None):
        raise AssertionError("never called")

    monkeypatch.setattr(mm, "create_causal_mask", create_causal_mask)
    with pytest.raises(ImportError, match=f"transformers {transformers.__version__} passes the KV cache"):
        mm._installed_cache_name()


ROUTERS = {
    "topk_softmax": dict(),
    "switch_capacity": dict(router_type="switch", num_experts_per_tok=1, capacity_factor_eval=1.0),
    "expert_choice": dict(router_type="expert_choice"),
    "sigmoid_grouped_aux_free": dict(
        router_type="sigmoid_grouped", n_group=2, topk_group=1, router_bias_update_rate=0.01, num_shared_experts=1
    ),
    "soft": dict(router_type="soft", router_aux_loss_coef=0.0, soft_slots_per_expert=2, soft_group_size=2),
}
SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])


@pytest.mark.parametrize("cache_kind", ["dynamic", "static", "sliding_dynamic", "sliding_static"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_cached_generation_equals_uncached_for_every_cache_kind(router, cache_kind, deprecation_messages):
    overrides = dict(ROUTERS[router], **(SLIDING if cache_kind.startswith("sliding") else {}))
    model = MoeForCausalLM(tiny_config(**overrides)).eval()
    ids = _ids(2, 6)  # prompt + 10 new tokens pass the sliding window of 4 several times
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    kwargs = dict(GREEDY, attention_mask=mask)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    cache = {"cache_implementation": "static"} if cache_kind.endswith("static") else {}
    cached = model.generate(ids, use_cache=True, **cache, **kwargs)
    assert torch.equal(cached, uncached)
    assert deprecation_messages == []


def test_continuous_batching_equals_generate():
    """`generate_batch` (continuous batching on a paged cache) gives each prompt the tokens `generate` gives it
    alone. In 5.24 the paged cache fills the attention kwargs inside `cache.update(..., kwargs=kwargs)`; without
    that argument every request came back empty."""
    model = MoeForCausalLM(tiny_config()).eval()
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    config = transformers.GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    small_cache = transformers.ContinuousBatchingConfig(page_size=16, num_blocks=8, max_batch_tokens=32)
    results = model.generate_batch(
        inputs=prompts, generation_config=config, continuous_batching_config=small_cache, warmup=False
    )
    by_prompt = {tuple(r.prompt_ids): r.generated_tokens for r in results.values()}
    for prompt in prompts:
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=-1)
        assert by_prompt[tuple(prompt)] == alone[0, len(prompt) :].tolist()


def test_greedy_tokens_equal_mixtrals_with_cache():
    torch.manual_seed(0)
    theirs = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            pad_token_id=0,
        )
    ).eval()
    ours = from_mixtral(theirs)
    ids = _ids(1, 5)
    for cache in ({}, {"cache_implementation": "static"}):
        expected = theirs.generate(ids, **GREEDY, **cache)
        assert torch.equal(ours.generate(ids, **GREEDY, **cache), expected)
    assert torch.equal(ours.generate(ids, use_cache=False, **GREEDY), expected)


def test_an_upcycled_model_generates_the_dense_models_tokens(tmp_path):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
    ).eval()
    dense.save_pretrained(tmp_path / "dense")
    moe = upcycle(tmp_path / "dense", num_experts=4, num_experts_per_tok=2, router_init="normal").eval()
    ids = _ids(2, 5)
    expected = dense.generate(ids, **GREEDY)
    assert torch.equal(moe.generate(ids, **GREEDY), expected)
    assert torch.equal(moe.generate(ids, use_cache=False, **GREEDY), expected)


def test_gradient_checkpointing_drops_the_cache_under_the_installed_name():
    """transformers' checkpointing wrapper clears the cache keyword it knows (`cache` from 5.24, `past_key_values`
    before) so the backward replay cannot write the cache twice: our layers must receive it under that name."""
    model = MoeForCausalLM(tiny_config()).train()
    model.gradient_checkpointing_enable()
    ids = _ids()
    cache = DynamicCache(config=model.config)
    out = model(ids, labels=ids, use_cache=True, cache=cache)
    out.loss.backward()
    assert cache.get_seq_length() == 0, "a checkpointed layer wrote the cache"
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n and p.requires_grad)


LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_moe"] = None  # this process has transformers but not our package
    sys.modules["triton"] = None
    import os
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != {repo!r}]
    import json, logging, warnings
    warnings.simplefilter("error", FutureWarning)
    import torch, transformers
    from transformers import AutoModelForCausalLM
    said = []
    class Collect(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())
    logging.getLogger("transformers").addHandler(Collect(level=logging.WARNING))
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    ids = torch.load(sys.argv[2], weights_only=True)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=mask)
    out = {{
        "cached": model.generate(ids, **kwargs),
        "static": model.generate(ids, cache_implementation="static", **kwargs),
        "uncached": model.generate(ids, use_cache=False, **kwargs),
    }}
    with torch.no_grad():
        out["logits"] = model(ids, attention_mask=mask).logits
    torch.save(out, sys.argv[3])
    said = [s for s in said if "deprecat" in s.lower() or "past_key_values" in s]
    print(json.dumps({{"transformers": transformers.__version__, "deprecations": said}}))
    """
)


def _interpreters() -> list[str]:
    others = [p for p in os.environ.get("MOE_COMPAT_PYTHONS", "").split(os.pathsep) if p]
    return [sys.executable, *others]


@pytest.mark.parametrize("python", _interpreters(), ids=lambda p: "this-python" if p == sys.executable else p)
def test_saved_folder_generates_correctly_in_a_fresh_process_without_the_package(tmp_path, python):
    """Saved with the package under this release, loaded with trust_remote_code under each tested release: cached
    greedy generation (dynamic and static cache) equals uncached, and both equal the saved model's."""
    config = tiny_config(**SLIDING, router_type="switch", num_experts_per_tok=1, capacity_factor_eval=1.0)
    model = MoeForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "model")
    ids = _ids(2, 6)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "load.py").write_text(LOADER.format(repo=str(REPO_ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    args = [python, str(tmp_path / "load.py"), str(tmp_path / "model"), str(tmp_path / "ids.pt"), str(tmp_path / "o")]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"loaded under transformers {info['transformers']} (saved under {transformers.__version__})")
    assert info["deprecations"] == []

    remote = torch.load(tmp_path / "o", weights_only=True)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    expected = model.generate(ids, use_cache=False, attention_mask=mask, **GREEDY)
    assert torch.equal(remote["uncached"], expected)
    assert torch.equal(remote["cached"], expected)
    assert torch.equal(remote["static"], expected)
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
