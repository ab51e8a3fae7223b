"""Shared fixtures: tiny configs (hidden <= 64, 2 layers) and offline Hugging Face settings."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from modeling_moe import MoeConfig

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_report_header(config):
    """The releases under test, in the first lines of every run's log (scripts/test.sh runs two)."""
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def tiny_config(**overrides) -> MoeConfig:
    """A 2-layer, hidden-32 config; every test starts from this and overrides what it studies."""
    values = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        router_aux_loss_coef=0.01,
    )
    values.update(overrides)
    return MoeConfig(**values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def hf_modules_cache(tmp_path, monkeypatch):
    """Point transformers' remote-code module cache at a temporary folder."""
    path = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(path))
    return path
