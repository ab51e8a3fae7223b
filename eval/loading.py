"""Load what the harness evaluates: a model folder of this repository, a Hub-style folder or id, or a transformers
Mixtral (converted with `modeling_moe.convert.from_mixtral`, same logits, so that its routing is recorded like
ours), plus its tokenizer. Weights are read with safetensors only, strictly (`modeling_moe.checkpoint.load_pretrained`):
missing, unexpected or wrong-shape tensors are refused.

Code shipped in a folder (`auto_map`) runs only with consent (`trust_remote_code=True`, `--trust_remote_code`),
as in transformers. This repository's models never need it: `model_type` "moe_lm" always loads with the installed
`modeling_moe` classes, even where the folder ships its own copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from modeling_moe import MoeForCausalLM  # importing it registers model_type "moe_lm" with the Auto classes
from modeling_moe.checkpoint import CheckpointError, check_checkpoint_folder, load_pretrained
from modeling_moe.convert import from_mixtral

from .errors import EvalInputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for evaluation.

    model: in eval mode on the requested device. source: the path or id it came from. kind: "moe" (routing is
    recorded), "mixtral" (converted to ours, routing recorded) or "dense" (any other causal LM: quality only).
    converted_from: "mixtral" when the weights were converted, else None.
    """

    model: PreTrainedModel
    source: str
    kind: str
    converted_from: str | None = None

    @property
    def has_routing(self) -> bool:
        """True when forward passes return router logits and indices (this repository's `MoeForCausalLM`)."""
        return self.kind in ("moe", "mixtral")


def resolve_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """`"float32"` / `"bfloat16"` (or fp32 / bf16) -> torch dtype; raises `EvalInputError` naming `field`."""
    if name not in DTYPES:
        raise EvalInputError(f"{field} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_model_source(source: str, field: str = "model") -> Path | None:
    """Check a model argument before loading anything.

    Args:
        source: a local folder, or a Hub id "owner/name" (only usable when that id is in the local cache).
        field: the argument name used in error messages.
    Returns:
        The folder as a `Path`, or None for a Hub id.
    Raises:
        EvalInputError: the folder does not exist, has no config.json, lacks a routing field of a saved MoE
            config, or has no readable safetensors weights (a folder with only pickle weights,
            `pytorch_model.bin`, is refused: this project never unpickles weights); see `modeling_moe.checkpoint`.
    """
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
    if not looks_local:
        return None
    if not path.is_dir():
        raise EvalInputError(f"{field}: {source!r} is not a folder (expected a model folder or a Hub id owner/name)")
    try:
        check_checkpoint_folder(path)
    except CheckpointError as err:
        raise EvalInputError(f"{field}: {err}") from err
    return path


def load_config(source: str, trust_remote_code: bool = False, field: str = "model") -> tuple[PretrainedConfig, bool]:
    """The config of `source` and whether its own code must run: first with installed classes only (this
    repository's `model_type` "moe_lm" is installed), then, only with consent, with the folder's code.

    Raises:
        EvalInputError: the folder ships code that would have to run and `trust_remote_code` is False, or the
            config cannot be read.
    """
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False), False
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise EvalInputError(f"{field}: {source!r} has an unusable config: {err}") from err
        if not trust_remote_code:
            raise EvalInputError(
                f"{field}: {source!r} ships its own modeling code (config auto_map) that would run on load; pass "
                "--trust_remote_code only if you trust it"
            ) from err
    except OSError as err:  # not found locally and not reachable on the Hub
        raise EvalInputError(f"{field}: could not load a model from {source!r}: {err}") from err
    return AutoConfig.from_pretrained(source, trust_remote_code=True), True


def load_model(
    source: str, dtype: str = "float32", device: str = "cpu", field: str = "model", trust_remote_code: bool = False
) -> LoadedModel:
    """Load a causal LM for evaluation.

    Args:
        source: model folder or Hub id. Models of this repository (`model_type` "moe_lm") load with the installed
            `MoeForCausalLM`, whether or not the folder ships its own copy of the code; Mixtral is converted to
            ours; any other model loads with transformers' installed classes, or with the code its folder ships
            (`auto_map`) only when `trust_remote_code` is True.
        dtype: "float32" or "bfloat16". device: a torch device string.
        field: argument name for error messages.
        trust_remote_code: consent to run code shipped with the model (off by default).
    Returns:
        A `LoadedModel` in eval mode.
    Raises:
        EvalInputError: see `check_model_source` and `load_config`; also a checkpoint with missing, unexpected or
            wrong-shape tensors (`modeling_moe.checkpoint.CheckpointError`).
    """
    check_model_source(source, field)
    torch_dtype = resolve_dtype(dtype)
    config, remote = load_config(source, trust_remote_code, field)
    try:
        if config.model_type == "mixtral":
            model = from_mixtral(source).to(device=device, dtype=torch_dtype)
            return LoadedModel(model.eval(), str(source), "mixtral", converted_from="mixtral")
        # `remote` is False for ours (config loaded as the installed MoeConfig): the installed MoeForCausalLM
        model = load_pretrained(AutoModelForCausalLM, source, trust_remote_code=remote, dtype=torch_dtype)
    except CheckpointError as err:
        raise EvalInputError(f"{field}: {err}") from err
    except OSError as err:  # not found locally and not reachable on the Hub
        raise EvalInputError(f"{field}: could not load a model from {source!r}: {err}") from err
    model = model.to(device).eval()
    kind = "moe" if isinstance(model, MoeForCausalLM) else "dense"
    return LoadedModel(model, str(source), kind)


def load_tokenizer(
    source: str | None, model_source: str, field: str = "tokenizer", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer from `source`, else from the model folder (its shipped code only with `trust_remote_code`).

    Raises:
        EvalInputError: neither holds a tokenizer; the message says to pass `--tokenizer`.
    """
    where = source or model_source
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        hint = "" if source else f" (the model folder has none; pass --{field} PATH)"
        raise EvalInputError(f"{field}: no tokenizer could be loaded from {where!r}{hint}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_local_folder(source: str) -> bool:
    """True when `source` names an existing local folder."""
    return os.path.isdir(os.path.expanduser(source))


__all__ = [
    "DTYPES",
    "EvalInputError",
    "LoadedModel",
    "check_model_source",
    "is_local_folder",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve_dtype",
]
