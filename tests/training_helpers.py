"""Shared pieces of the training tests: a small real-text corpus and tiny-run arguments (hidden <= 64, 2 layers,
blocks of 32 tokens)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from modeling_moe.corpus import write_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_CHARS = 60_000

# A tiny Mixtral-style model: hidden 32, 2 layers, 4 experts, top-2, dropless, vocab 320 (bytes + BPE merges).
TINY_OVERRIDES = (
    '{"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 48, '
    '"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}'
)


def make_corpus(folder: Path) -> Path:
    """Write a small corpus of stdlib docstrings (one paragraph per line) into `folder`."""
    return write_corpus(folder / "corpus.txt", max_chars=CORPUS_CHARS)


def tiny_run_args(corpus: Path, out: Path, cache: Path, **extra) -> list[str]:
    """Command-line arguments of a tiny `training.train` run; `extra` adds or replaces `--key value` pairs."""
    values = {
        "preset": "tiny-mixtral",
        "config_overrides": TINY_OVERRIDES,
        "train_file": str(corpus),
        "output_dir": str(out),
        "cache_dir": str(cache),
        "block_size": "32",
        "per_device_train_batch_size": "4",
        "learning_rate": "3e-3",
        "max_steps": "8",
        "logging_steps": "1",
        "save_steps": "4",
        "disable_tqdm": "true",
        "seed": "0",
    }
    values.update({k: str(v) for k, v in extra.items()})
    return [item for key, value in values.items() for item in (f"--{key}", value)]


def offline_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: offline, one thread each, no inherited PYTHONPATH surprises."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port nobody listens on now (for torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(log_history: list[dict]) -> dict[int, float]:
    """step -> training loss from a Trainer log history."""
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}
