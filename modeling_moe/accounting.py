"""Parameter accounting: total and active parameters per component, from a config (meta device) or a model."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .configuration_moe import MoeConfig
from .modeling_moe import MoeForCausalLM

COMPONENTS = ("embeddings", "attention", "routers", "experts", "shared_experts", "dense_ffn", "norms", "head")

# First matching pattern wins; every parameter of MoeForCausalLM matches exactly one.
_COMPONENT_PATTERNS = (
    ("embeddings", re.compile(r"(^|\.)embed_tokens\.")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("routers", re.compile(r"\.mlp\.router\.")),
    ("experts", re.compile(r"\.mlp\.experts\.")),
    ("shared_experts", re.compile(r"\.mlp\.shared_expert(_gate)?\.")),
    ("dense_ffn", re.compile(r"\.mlp\.(gate|up|down)_proj\.")),
    ("norms", re.compile(r"(layernorm|(^|\.)norm)\.weight$")),
    ("head", re.compile(r"^lm_head\.")),
)


@dataclass
class ParameterCount:
    """Parameter counts per component (see `COMPONENTS`).

    `total[c]` counts every parameter of component c once (tied weights once). `active[c]` counts the
    parameters one token uses in a forward pass: experts scale by k / E (all experts for Soft MoE), everything
    else is fully active.
    """

    total: dict[str, int] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        """Sum of `total` over components."""
        return sum(self.total.values())

    @property
    def active_params(self) -> int:
        """Sum of `active` over components."""
        return sum(self.active.values())


def _component(name: str) -> str:
    for component, pattern in _COMPONENT_PATTERNS:
        if pattern.search(name):
            return component
    raise ValueError(f"parameter {name!r} belongs to no known component {COMPONENTS}")


def count_parameters(config_or_model: MoeConfig | nn.Module) -> ParameterCount:
    """Count total and active parameters per component.

    Args:
        config_or_model: a `MoeConfig` (the model is built on the meta device, so no memory is allocated)
            or a built `MoeForCausalLM`.
    Returns:
        A `ParameterCount`; `.total_params` and `.active_params` give the sums.
    Raises:
        TypeError: for anything else.
    """
    if isinstance(config_or_model, MoeConfig):
        with torch.device("meta"):
            model = MoeForCausalLM(config_or_model)
    elif getattr(getattr(config_or_model, "config", None), "model_type", None) == MoeConfig.model_type:
        model = config_or_model  # ours, or the same classes loaded from a folder's own code (trust_remote_code)
    elif getattr(config_or_model, "model_type", None) == MoeConfig.model_type:  # a remote-code MoeConfig
        return count_parameters(MoeConfig.from_dict(config_or_model.to_dict()))
    else:
        raise TypeError(f"count_parameters takes a MoeConfig or a MoeForCausalLM, got {type(config_or_model).__name__}")
    config = model.config
    active_fraction = config.num_experts_per_tok / config.num_local_experts
    if config.router_type == "soft":  # every token's output mixes every expert's slots (FLOPs: E * slots / G rows)
        active_fraction = 1.0
    counts = ParameterCount(total=dict.fromkeys(COMPONENTS, 0), active=dict.fromkeys(COMPONENTS, 0))
    packed = _packed_parameters(model)
    for name, param in model.named_parameters():  # tied parameters are listed once
        component = _component(name)
        counts.total[component] += param.numel() * packed.get(name, 1)
    for component, n in counts.total.items():
        counts.active[component] = round(n * active_fraction) if component == "experts" else n
    return counts


def _is_quantized_experts(module: nn.Module) -> bool:
    """`quantized_experts.QuantizedMoeExperts`, ours or a folder's own copy of it (trust_remote_code)."""
    return type(module).__name__ == "QuantizedMoeExperts"


def _packed_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter name -> weights per stored element, for packed quantized experts (int4: 2 per byte)."""
    return {
        f"{name}.{p}": module.values_per_element
        for name, module in model.named_modules()
        if _is_quantized_experts(module) and module.values_per_element > 1
        for p in ("gate_up_proj", "down_proj")
    }


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model's weights take as it is (its real dtypes), per component (see `COMPONENTS`): parameters
    (tied ones once) plus the scales of quantized experts, which are buffers."""
    sizes = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        sizes[_component(name)] += param.numel() * param.element_size()
    for name, module in model.named_modules():
        if _is_quantized_experts(module):
            for scale in (module.gate_up_proj_scale, module.down_proj_scale):
                sizes[_component(f"{name}.scale")] += scale.numel() * scale.element_size()
    return sizes


__all__ = ["COMPONENTS", "ParameterCount", "count_parameters", "weight_bytes"]
