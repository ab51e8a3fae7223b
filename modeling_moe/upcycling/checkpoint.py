"""Reading dense checkpoints: the key map and the tensor sources.

`KEY_MAP` classifies every dense state-dict key (copy / ffn / head / ignore; an unknown key is an error).
`StateDictSource` serves an in-memory model; `SafetensorsSource` a folder of safetensors shards (single file or
indexed), read on demand with `safe_open`, one file open at a time, never pickle. `open_dense` turns the user's
input (a model object or a folder) into its config and a source.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..checkpoint import CheckpointError, check_finite, safetensors_files
from .families import dense_family
from .options import UpcyclingError

COPY, FFN, HEAD, IGNORE = "copy", "ffn", "head", "ignore"
# Dense state-dict key -> what happens to it. First match wins; an unmatched key is an error.
#   copy:   same name and value in the MoE model (embeddings, norms, attention with its biases).
#   ffn:    layer i's dense FFN: copied unchanged when layer i stays dense, else turned into MOE_LAYER_KEYS.
#   head:   lm_head, dropped when the embeddings are tied.
#   ignore: stale buffers some old checkpoints carry.
KEY_MAP: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^model\.embed_tokens\.weight$"), COPY),
    (re.compile(r"^model\.norm\.weight$"), COPY),
    (re.compile(r"^lm_head\.weight$"), HEAD),
    (re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$"), COPY),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.[qkvo]_proj\.(weight|bias)$"), COPY),
    (re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)$"), FFN),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq$"), IGNORE),
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def classify_key(key: str) -> tuple[str, int | None]:
    """The `KEY_MAP` rule for one dense state-dict key and its layer index (None outside the decoder layers).

    Raises:
        UpcyclingError: the key matches no rule (an architecture variant this map does not know).
    """
    for pattern, rule in KEY_MAP:
        if pattern.match(key):
            layer = _LAYER_RE.match(key)
            return rule, int(layer.group(1)) if layer else None
    raise UpcyclingError(
        f"dense checkpoint key {key!r} matches no rule of upcycling.KEY_MAP; only Llama / Mistral / Qwen2 "
        "causal-LM state dicts (embed_tokens, layers.*.self_attn/mlp/norms, norm, lm_head) are understood"
    )


class StateDictSource:
    """Dense tensors from an in-memory model (already loaded: nothing to stream)."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach() for k, v in model.state_dict().items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every tensor."""
        return {k: tuple(v.shape) for k, v in self.state.items()}

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named tensors, on the CPU (where the output shards are assembled)."""
        return {n: self.state[n].cpu() for n in names}


def _readable_safetensors(folder: Path) -> dict[str, Path]:
    """`modeling_moe.checkpoint.safetensors_files`: unreadable (truncated, corrupt) shards named, as by every loader."""
    try:
        return safetensors_files(folder)
    except CheckpointError as err:
        raise UpcyclingError(str(err)) from err


class SafetensorsSource:
    """Dense tensors from a folder of safetensors shards, read on demand with `safe_open`, one file open at a time.

    Raises (at construction, before anything is written):
        FileNotFoundError: the folder has no weights, or a shard named by the index is missing.
        UpcyclingError: the folder only has pickle weights (.bin / .pt), or the index names keys a shard lacks.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (folder / SAFE_WEIGHTS_NAME).is_file():
            self.weight_map = dict.fromkeys(_readable_safetensors(folder), SAFE_WEIGHTS_NAME)
        elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise UpcyclingError(
                f"{folder} has only pickle weights (.bin/.pt); upcycling reads safetensors only (never pickle). "
                "Convert them first, e.g. load the model and save_pretrained(..., safe_serialization=True)"
            )
        else:
            raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {folder}")
        shards = sorted(set(self.weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"missing shard(s) {missing} of {folder / SAFE_WEIGHTS_INDEX_NAME}")
        _readable_safetensors(folder)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            with safe_open(folder / shard, framework="pt") as f:
                present = set(f.keys())
                for key in (k for k, s in self.weight_map.items() if s == shard):
                    if key not in present:
                        raise UpcyclingError(f"index says {key!r} is in shard {shard}, which does not hold it")
                    self._shapes[key] = tuple(f.get_slice(key).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every tensor (from the shard headers; no data read)."""
        return dict(self._shapes)

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named tensors, shard by shard: each shard is opened, read and closed before the next."""
        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for shard, keys in by_shard.items():
            with safe_open(self.folder / shard, framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in keys}
            try:  # NaN / Inf would be copied into every expert
                check_finite(tensors, self.folder / shard)
            except CheckpointError as err:
                raise UpcyclingError(str(err)) from err
            out.update(tensors)
        return out


def open_dense(dense_model_or_dir) -> tuple[object, object, PreTrainedModel | Path]:
    """(dense config, tensor source, model object or folder path) of the input.

    Raises:
        FileNotFoundError: no such folder or no config.json. UpcyclingError: unsupported input or architecture.
    """
    if isinstance(dense_model_or_dir, PreTrainedModel):
        dense_family(dense_model_or_dir.config)
        return dense_model_or_dir.config, StateDictSource(dense_model_or_dir), dense_model_or_dir
    if not isinstance(dense_model_or_dir, (str, os.PathLike)):
        raise UpcyclingError(
            "dense_model_or_dir must be a transformers causal LM or a checkpoint folder, "
            f"got {type(dense_model_or_dir).__name__}"
        )
    folder = Path(dense_model_or_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no dense checkpoint at {folder}: config.json not found (local folders only)")
    config = AutoConfig.from_pretrained(folder)
    dense_family(config)
    return config, SafetensorsSource(folder), folder
