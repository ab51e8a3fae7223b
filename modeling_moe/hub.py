"""Hub-ready output folders: weights, config with `auto_map`, modeling files, tokenizer, model card — written
atomically, so a failure never leaves a half-written folder behind."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .accounting import ParameterCount, count_parameters
from .modeling_moe import MoeForCausalLM


class UnsafeOutputError(ValueError):
    """An output folder is, contains or lies inside an input: writing it would destroy the input."""


def check_disjoint(source: str | os.PathLike, out: str | os.PathLike, source_name: str, out_name: str) -> None:
    """Refuse an output folder that is, contains or lies inside the input `source`.

    Raises:
        UnsafeOutputError: naming both (`source_name`, `out_name` are the argument names for the message).
    """
    a, b = Path(source).resolve(), Path(out).resolve()
    if a == b or a in b.parents or b in a.parents:
        relation = "is" if a == b else ("is inside" if a in b.parents else "contains")
        raise UnsafeOutputError(
            f"{out_name} {str(out)!r} {relation} the input {source_name} {str(source)!r}; writing it would destroy "
            "the input: choose an output folder outside it"
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's live process
        return True
    return True


def _leftovers(out: Path, kind: str) -> list[tuple[Path, int]]:
    """(path, pid) of the hidden `.NAME.<kind>-PID-*` siblings of `out` left by `atomic_directory`."""
    found = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
        pid = path.name[len(f".{out.name}.{kind}-") :].split("-", 1)[0]
        if pid.isdigit():
            found.append((path, int(pid)))
    return found


def recover_interrupted(out_dir: str | os.PathLike) -> None:
    """Undo what a killed `atomic_directory(out_dir)` left behind (only leftovers of processes no longer alive).

    * `out_dir` missing and `.NAME.old-PID-*` present (killed between the two renames of an overwrite): the old
      folder is renamed back to `out_dir`, so the previous model is restored;
    * `.NAME.old-PID-*` next to an existing `out_dir` (killed before deleting the replaced folder): deleted;
    * `.NAME.tmp-PID-*` (killed while writing): deleted.
    """
    out = Path(out_dir)
    if not out.parent.is_dir():
        return
    for backup, pid in sorted(_leftovers(out, "old"), key=lambda t: t[0].stat().st_mtime, reverse=True):
        if _pid_alive(pid):  # a live process (this one included) may be mid-swap: not ours to touch
            continue
        if not out.exists():
            os.replace(backup, out)
        else:
            shutil.rmtree(backup, ignore_errors=True) if backup.is_dir() else backup.unlink()
    for tmp, pid in _leftovers(out, "tmp"):
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out_dir`, on error it is deleted.

    The temporary folder `.NAME.tmp-PID-*` gets the permissions a plain `mkdir` would (0777 minus the umask), not
    mkdtemp's 0700. An overwrite renames the old folder to `.NAME.old-PID-*`, the new one into place, then deletes
    the old one. A process killed on the way leaves those hidden siblings; the next `atomic_directory` (or
    `recover_interrupted`) on the same `out_dir` restores the old folder when `out_dir` is missing and deletes the
    rest (`recover_interrupted`).

    Args:
        out_dir: the final folder.
        overwrite: replace an existing non-empty `out_dir`; otherwise that is an error.
    Raises:
        FileExistsError: `out_dir` exists, is not empty, and `overwrite` is False.
    """
    out = Path(out_dir)
    recover_interrupted(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, out)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing what is there."""
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(out, backup)
    os.replace(tmp, out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True) if backup.is_dir() else backup.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`, with the permissions
    a plain `open()` would give under the umask (not mkstemp's 0600). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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

    A model sharded by transformers' engines (`from_pretrained(..., distributed_config=...)`) is saved by every
    rank together (the shards are gathered into full tensors); call this on every rank then. The folder is the
    same as a single process writes.

    Returns:
        The path of the finished folder.
    """
    out = Path(out_dir)
    if getattr(model, "is_distributed_loading_by_transformers", False):
        return _save_sharded_hub_ready(model, out, tokenizer, card, overwrite, max_shard_size)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card if card is not None else model_card(model, out.name))
    return out


def _save_sharded_hub_ready(model, out: Path, tokenizer, card, overwrite, max_shard_size) -> Path:
    """`save_hub_ready` on every rank of a sharded model: all ranks gather into one temporary folder (its name
    is the same on every rank), rank 0 finishes and moves it."""
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    name = [f".{out.name}.tmp-{os.getpid()}-sharded"]  # rank 0's pid: `recover_interrupted` knows the pattern
    dist.broadcast_object_list(name)
    tmp = out.with_name(name[0])
    if rank0:
        recover_interrupted(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise FileExistsError(f"output folder {out} exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    text = card if card is not None else model_card(model, out.name)  # parameter counts: every rank (DTensors)
    if rank0:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(text)
        _replace(tmp, out)
    dist.barrier()
    return out


__all__ = [
    "UnsafeOutputError",
    "atomic_directory",
    "atomic_write_text",
    "check_disjoint",
    "model_card",
    "recover_interrupted",
    "save_hub_ready",
]
