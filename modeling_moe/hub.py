"""Hub-ready output folders: weights, config with `auto_map`, modeling files, tokenizer, model card — written
atomically, so a failure never leaves a half-written folder behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .accounting import ParameterCount, count_parameters
from .modeling_moe import MoeForCausalLM


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out_dir`, on error it is deleted.

    Args:
        out_dir: the final folder.
        overwrite: replace an existing non-empty `out_dir`; otherwise that is an error.
    Raises:
        FileExistsError: `out_dir` exists, is not empty, and `overwrite` is False.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    os.replace(tmp, out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True) if backup.is_dir() else backup.unlink()


def _fmt(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def model_card(
    model: MoeForCausalLM,
    name: str,
    base_model: str | None = None,
    description: str = "",
    extra_tags: tuple[str, ...] = (),
) -> str:
    """A README.md with YAML metadata (library, tags, `base_model`, parameter counts) and loading instructions.

    Args:
        model: the model to describe. name: a title. base_model: Hub id or path it came from, if any.
        description: markdown placed under the title (how it was made: upcycled, fine-tuned, ...).
        extra_tags: more Hub tags.
    Returns:
        The markdown text.
    """
    config = model.config
    counts: ParameterCount = count_parameters(model)
    tags = ["moe", "mixture-of-experts", "custom_code", config.router_type, *extra_tags]
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    meta += [f"- {t}" for t in dict.fromkeys(tags)]
    if base_model:
        meta.append(f"base_model: {base_model}")
    meta += [
        "model-index: []",
        f"total_parameters: {counts.total_params}",
        f"active_parameters: {counts.active_params}",
    ]
    meta.append("---")
    rows = "\n".join(
        f"| {c} | {counts.total[c]:,} | {counts.active[c]:,} |"
        for c in counts.total
        if counts.total[c] or c == "experts"
    )
    body = f"""
# {name}

{description}

A mixture-of-experts causal LM: {_fmt(counts.total_params)} parameters in total, {_fmt(counts.active_params)} active
per token. {config.num_local_experts} experts per MoE layer, {config.num_experts_per_tok} per token
(`router_type="{config.router_type}"`), MoE layers {config.moe_layers} of {config.num_hidden_layers}.
Capacity factor: train {config.capacity_factor_train}, eval {config.capacity_factor_eval} (None = dropless);
generation is dropless unless `capacity_in_generation` is set.

| component | total | active |
|---|---|---|
{rows}
| **all** | **{counts.total_params:,}** | **{counts.active_params:,}** |

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("<this folder or repo>", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>", trust_remote_code=True)
```

The modeling code ships with the weights (`configuration_moe.py`, `modeling_moe.py` and their flat imports);
it needs only torch and transformers.
"""
    return "\n".join(meta) + "\n" + body


def save_hub_ready(
    model: MoeForCausalLM,
    out_dir: str | os.PathLike,
    tokenizer=None,
    card: str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a folder that `push_to_hub` / `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` take.

    Writes safetensors shards, `config.json` with `auto_map`, the modeling files, `generation_config.json`,
    the tokenizer (when given) and README.md (the given card, or `model_card(model, folder name)`), atomically.

    Returns:
        The path of the finished folder.
    """
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card if card is not None else model_card(model, out.name))
    return out


__all__ = ["atomic_directory", "model_card", "save_hub_ready"]
