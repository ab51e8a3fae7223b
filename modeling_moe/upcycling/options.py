"""The upcycling options: `UpcycleOptions` and its validation, the error type, and the per-layer seed.

Every choice `upcycle` takes is one field of the frozen `UpcycleOptions`; `validate` checks them all against the
dense model before anything is read or written, and raises `UpcyclingError` naming the field and what is allowed.
`layer_generator` gives each (seed, layer) its own generator, so a layer's draws do not depend on the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..configuration_moe import ROUTER_TYPES


class UpcyclingError(ValueError):
    """An upcycling argument or dense checkpoint cannot be used. The message names the field and what is allowed."""


EXPERT_INIT_NAMES = ("copy", "drop_upcycling", "neuron_split")
ROUTER_INIT_NAMES = ("zeros", "normal", "hidden")
SPLIT_MODES = ("random", "cluster")


@dataclass(frozen=True)
class UpcycleOptions:
    """Every upcycling choice, validated by `validate` (see `upcycle` for the meaning of each)."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    router_type: str = "topk_softmax"
    moe_layers: str | tuple[int, ...] = "all"
    expert_init: str = "copy"
    noise_std: float = 0.0
    drop_ratio: float = 0.5
    split_mode: str = "random"
    split_down_scale: float | None = None
    shared_expert: bool = False
    shared_expert_weight: float = 0.5
    router_init: str = "normal"
    router_std: float | None = None
    router_scale: float = 1.0
    calibration_max_tokens: int = 4096
    seed: int = 0

    def validate(self, num_layers: int, intermediate_size: int, mlp_bias: bool) -> UpcycleOptions:
        """Check every option against the dense model; return a copy with `moe_layers` resolved to a tuple.

        Raises:
            UpcyclingError: naming the first bad option and what is allowed.
        """
        E, k = self.num_experts, self.num_experts_per_tok
        for name in ("num_experts", "num_experts_per_tok", "calibration_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UpcyclingError(f"{name} must be an integer >= 1, got {value!r}")
        if k > E:
            raise UpcyclingError(f"num_experts_per_tok ({k}) must be <= num_experts ({E})")
        upcyclable = tuple(r for r in ROUTER_TYPES if r != "soft")
        if self.router_type == "soft":  # Φ has one row per slot and no token-choice init; see soft_conversion.py
            raise UpcyclingError(
                f"router_type='soft' cannot be upcycled into (the router initialisations are for token-choice "
                f"routers); upcycle with one of {upcyclable} and build a Soft MoE from the config instead"
            )
        if self.router_type not in ROUTER_TYPES:
            raise UpcyclingError(f"router_type must be one of {upcyclable}, got {self.router_type!r}")
        if self.router_type == "switch" and k != 1:
            raise UpcyclingError(
                f"router_type='switch' routes each token to one expert: num_experts_per_tok must be 1, got {k}"
            )
        if self.expert_init not in EXPERT_INIT_NAMES:
            raise UpcyclingError(f"expert_init must be one of {EXPERT_INIT_NAMES}, got {self.expert_init!r}")
        if self.router_init not in ROUTER_INIT_NAMES:
            raise UpcyclingError(f"router_init must be one of {ROUTER_INIT_NAMES}, got {self.router_init!r}")
        if self.split_mode not in SPLIT_MODES:
            raise UpcyclingError(f"split_mode must be one of {SPLIT_MODES}, got {self.split_mode!r}")
        if not _is_number(self.noise_std) or self.noise_std < 0:
            raise UpcyclingError(f"noise_std must be a number >= 0, got {self.noise_std!r}")
        if self.noise_std > 0 and self.expert_init != "copy":
            raise UpcyclingError(
                f"noise_std > 0 applies to expert_init='copy' only, got expert_init={self.expert_init!r}"
            )
        if not _is_number(self.drop_ratio) or not 0 <= self.drop_ratio <= 1:
            raise UpcyclingError(f"drop_ratio must be a number in [0, 1], got {self.drop_ratio!r}")
        if not _is_number(self.shared_expert_weight) or not 0 <= self.shared_expert_weight <= 1:
            raise UpcyclingError(f"shared_expert_weight must be a number in [0, 1], got {self.shared_expert_weight!r}")
        if self.split_down_scale is not None and (not _is_number(self.split_down_scale) or self.split_down_scale <= 0):
            raise UpcyclingError(
                f"split_down_scale must be None (= num_experts) or a number > 0, got {self.split_down_scale!r}"
            )
        if self.router_std is not None and (not _is_number(self.router_std) or self.router_std < 0):
            raise UpcyclingError(
                f"router_std must be None (= initializer_range) or a number >= 0, got {self.router_std!r}"
            )
        if not _is_number(self.router_scale) or self.router_scale <= 0:
            raise UpcyclingError(f"router_scale must be a number > 0, got {self.router_scale!r}")
        if self.expert_init == "neuron_split" and intermediate_size % E != 0:
            raise UpcyclingError(
                f"expert_init='neuron_split' splits intermediate_size ({intermediate_size}) into num_experts ({E}) "
                "equal parts: num_experts must divide it"
            )
        return replace(self, moe_layers=resolve_moe_layers(self.moe_layers, num_layers))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_moe_layers(moe_layers: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """ "all" -> every layer; "every_other" -> layers 1, 3, 5, ... (Switch / Qwen2-MoE `decoder_sparse_step=2`);
    a list -> those layers, sorted.

    Raises:
        UpcyclingError: unknown string, an index outside [0, num_layers - 1], duplicates, or an empty list.
    """
    if isinstance(moe_layers, str):
        if moe_layers == "all":
            return tuple(range(num_layers))
        if moe_layers == "every_other" and num_layers >= 2:
            return tuple(i for i in range(num_layers) if (i + 1) % 2 == 0)
        raise UpcyclingError(
            f"moe_layers must be 'all', 'every_other' (needs >= 2 layers, model has {num_layers}) or a list of "
            f"layer indices, got {moe_layers!r}"
        )
    layers = list(moe_layers)
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if bad:
        raise UpcyclingError(f"moe_layers entries must be layer indices in [0, {num_layers - 1}], got {bad}")
    if len(set(layers)) != len(layers):
        raise UpcyclingError(f"moe_layers has duplicate layer indices: {layers}")
    if not layers:
        raise UpcyclingError("moe_layers is empty: upcycling needs at least one MoE layer")
    return tuple(sorted(layers))


def layer_generator(seed: int, layer_idx: int) -> torch.Generator:
    """A generator per (seed, layer): the same layer gets the same draws whatever else is converted."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer_idx + 1)
