"""Strict checkpoint loading: what every loader of this repository (eval, training, LoRA fine-tuning, upcycling,
Mixtral conversion) uses instead of a bare `from_pretrained`, so that a broken checkpoint fails with the tensors
and the file named instead of running on randomly initialised weights.

`load_pretrained(model_class, source)` refuses (`CheckpointError`, a ValueError):
    - a folder without config.json, or whose config.json is not a JSON object;
    - a folder with pickle weights only (*.bin / *.pt / *.pth): this project never unpickles weights;
    - a safetensors file whose header cannot be read (truncated, garbage), and an index naming a missing shard
      or a tensor its shard does not hold;
    - a `moe_lm` config.json that lacks a field deciding the routing (`ROUTING_FIELDS`): the class default
      would be used silently, e.g. a Switch model would load as top-k softmax;
    - tensors the model has but the checkpoint lacks (they would be initialised at random), tensors the
      checkpoint has but the model does not use (they would be ignored), and tensors of the wrong shape.
`check_finite(tensors, where)` refuses NaN / Inf weights where a loader reads the tensors anyway (upcycling).

Plain `from_pretrained` keeps transformers' behaviour (a load report); `MoePreTrainedModel.from_pretrained`
adds a `MoeWeightsInitializedWarning` when a router or expert tensor was initialised at load.

This module does not travel with saved models (it is not imported by the modeling files).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .modeling_moe import MoeWeightsInitializedWarning

# The fields of a saved `moe_lm` config.json that decide which experts a token goes to and with what weight.
ROUTING_FIELDS = (
    "router_type",
    "num_local_experts",
    "num_experts_per_tok",
    "mlp_layer_types",
    "norm_topk_prob",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
    "capacity_factor_train",
    "capacity_factor_eval",
    "capacity_policy",
    "router_bias_update_rate",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_LISTED = 8  # tensors named per kind in an error message


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded faithfully; the message names the folder or file and the tensors."""


def read_config_dict(folder: str | os.PathLike) -> dict:
    """The folder's config.json as a dict. Raises `CheckpointError` when it is missing or not a JSON object."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"folder {Path(folder)} has no config.json, so it is not a transformers model folder")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(values).__name__}")
    return values


def check_routing_fields(config_dict: Mapping, where: str | os.PathLike) -> None:
    """Refuse a saved `moe_lm` config that lacks a field of `ROUTING_FIELDS` (`moe_layers` may stand in for
    `mlp_layer_types`). Configs of other model types pass unchecked."""
    if config_dict.get("model_type") != "moe_lm":
        return
    present = set(config_dict)
    if "moe_layers" in present:
        present.add("mlp_layer_types")
    missing = [name for name in ROUTING_FIELDS if name not in present]
    if missing:
        raise CheckpointError(
            f"{where} lacks the routing field(s) {missing}; loading it would silently use the defaults and route "
            "differently from the model that was saved. Restore them (save_pretrained writes every field)"
        )


def safetensors_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it, read from the headers (no tensor data is read).

    Raises:
        CheckpointError: no safetensors weights (pickle-only folders included), an unreadable header (the
            file is named), an index that is not JSON or names a missing shard or a tensor its shard lacks.
    """
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a safetensors index (JSON with a 'weight_map'): {err}") from err
        shards = sorted(set(weight_map.values()))
    elif (folder / SAFE_WEIGHTS_NAME).is_file():
        weight_map, shards = None, [SAFE_WEIGHTS_NAME]
    else:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"folder {folder} has only pickle weights {pickled}; pickle weights are not loaded (this project "
                "reads safetensors only). Convert them first: load them where you trust them, save_pretrained"
            )
        raise CheckpointError(
            f"folder {folder} has no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME})"
        )
    files: dict[str, Path] = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise CheckpointError(f"{index} names the shard {shard}, which is missing")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    files[key] = path
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    if weight_map is not None:
        absent = [key for key, shard in weight_map.items() if files.get(key) != folder / shard]
        if absent:
            raise CheckpointError(f"{index} names tensors that their shards do not hold: {_names(absent)}")
    return files


def check_checkpoint_folder(folder: str | os.PathLike) -> dict[str, Path]:
    """Every check that needs no model: config.json, routing fields, readable safetensors weights.

    Returns:
        Tensor name -> file, as `safetensors_files`.
    Raises:
        CheckpointError: see the module docstring.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    check_routing_fields(read_config_dict(folder), folder / "config.json")
    return safetensors_files(folder)


def check_loading_info(info: Mapping, source: str | os.PathLike, files: Mapping[str, Path] | None = None) -> None:
    """Refuse a load whose transformers loading info (`output_loading_info=True`) reports missing, unexpected
    or wrong-shape tensors, or errors. `files` (tensor -> file) names the file of each offending tensor."""
    files = files or {}

    def where(key: str) -> str:
        return f"{key} ({files[key].name})" if key in files else key

    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing (would be initialised at random): {_names(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected (would be ignored): {_names(where(k) for k in info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        shapes = [f"{where(k)}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in info["mismatched_keys"]]
        problems.append(f"wrong shape: {_names(shapes)}")
    if info.get("error_msgs"):
        problems.append(f"errors: {list(info['error_msgs'])}")
    if problems:
        shards = sorted({p.name for p in files.values()})
        in_files = f" ({', '.join(shards)})" if shards else ""
        listing = "; ".join(problems)
        raise CheckpointError(f"checkpoint {source}{in_files} does not match its config; tensors {listing}")


def load_pretrained(model_class, source: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """`model_class.from_pretrained(source, **kwargs)` with safetensors only, refusing every checkpoint that would
    not load exactly (see the module docstring).

    Args:
        model_class: a model class or an Auto class (`MoeForCausalLM`, `AutoModelForCausalLM`, ...).
        source: a local folder (checked in full before loading), or a Hub id (only the loading info is checked).
        kwargs: passed to `from_pretrained` (dtype, config overrides, trust_remote_code, ...).
    Raises:
        CheckpointError: see the module docstring.
    """
    files: dict[str, Path] = {}
    if Path(source).expanduser().is_dir():
        source = Path(source).expanduser()
        files = check_checkpoint_folder(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoeWeightsInitializedWarning)  # refused below, with every tensor named
        try:
            model, info = model_class.from_pretrained(
                source, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except SafetensorError as err:  # a Hub download that is corrupt
            raise CheckpointError(f"{source}: a safetensors file is not readable: {err}") from err
    check_loading_info(info, source, files)
    return model


def check_finite(tensors: Mapping[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Refuse floating-point tensors holding NaN or Inf, naming them and `where` they came from."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{where} holds NaN or Inf values in {_names(bad)}")


def _names(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown} and {len(items) - _LISTED} more"


__all__ = [
    "ROUTING_FIELDS",
    "CheckpointError",
    "check_checkpoint_folder",
    "check_finite",
    "check_loading_info",
    "check_routing_fields",
    "load_pretrained",
    "read_config_dict",
    "safetensors_files",
]
