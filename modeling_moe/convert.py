"""Interop with transformers' Mixtral: `from_mixtral` and `to_mixtral`, as declarative key and field maps.

Weights use the same layout on both sides (experts as 3-D `gate_up_proj` (E, 2I, D) and `down_proj` (E, D, I)),
so the conversion is a rename of the router plus a config translation. Exporting lets engines that know
Mixtral but not remote code serve a Mixtral-style model of this repository.

One training-time difference remains: Mixtral's `router_jitter_noise` multiplies the hidden states fed to
router and experts, ours (Switch, Sec. 2.4) only the router input. With jitter 0, or in eval mode, the two
compute the same function.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from torch import nn
from transformers import AutoConfig, MixtralConfig, MixtralForCausalLM

from .checkpoint import load_pretrained
from .configuration_moe import TRANSFORMERS_DECODER_FIELDS, MoeConfig
from .modeling_moe import MoeForCausalLM

logger = logging.getLogger(__name__)

# Mixtral state-dict key pattern -> ours. Every other key has the same name on both sides.
MIXTRAL_TO_MOE_KEYS = {r"\.mlp\.gate\.weight$": ".mlp.router.weight"}
MOE_TO_MIXTRAL_KEYS = {r"\.mlp\.router\.weight$": ".mlp.gate.weight"}

# Config fields that mean the same thing on both sides.
SHARED_CONFIG_FIELDS = (
    *TRANSFORMERS_DECODER_FIELDS,
    "sliding_window",
    "num_experts_per_tok",
    "num_local_experts",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
)


def _rename(key: str, table: dict[str, str]) -> str:
    for pattern, replacement in table.items():
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


def mixtral_config_to_moe(config: MixtralConfig) -> MoeConfig:
    """Translate a `MixtralConfig` into the `MoeConfig` of the same architecture (every layer MoE)."""
    values = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    values["rope_parameters"] = dict(config.rope_parameters) if config.rope_parameters else None
    return MoeConfig(
        **values,
        intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.intermediate_size,
        router_type="topk_softmax",
        router_z_loss_coef=0.0,
    )


def moe_config_to_mixtral(config: MoeConfig) -> MixtralConfig:
    """Translate a `MoeConfig` into a `MixtralConfig`.

    Raises:
        ValueError: naming the first field Mixtral cannot express (dense layers, Switch routing, capacity,
            biases, mixed attention layer types).
    """
    problems = []
    if config.mlp_layer_types != ["sparse"] * config.num_hidden_layers:
        problems.append(f"moe_layers={config.moe_layers}: Mixtral has an MoE FFN on every layer")
    if config.router_type != "topk_softmax":
        problems.append(f"router_type={config.router_type!r}: Mixtral routes with 'topk_softmax'")
    if not config.resolved_norm_topk_prob:
        problems.append("norm_topk_prob=False: Mixtral always renormalises the top-k weights")
    if config.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={config.routed_scaling_factor}: Mixtral does not scale routed weights")
    if config.num_shared_experts:
        problems.append(f"num_shared_experts={config.num_shared_experts}: Mixtral has no shared experts")
    if config.router_bias_update_rate:
        problems.append(f"router_bias_update_rate={config.router_bias_update_rate}: Mixtral has no selection bias")
    for name in ("capacity_factor_train", "capacity_factor_eval"):
        if getattr(config, name) is not None:
            problems.append(f"{name}={getattr(config, name)}: Mixtral routing is dropless (None)")
    for name in ("attention_bias", "qkv_bias", "mlp_bias"):
        if getattr(config, name):
            problems.append(f"{name}=True: Mixtral has no biases")
    if config.expert_quantization is not None:
        problems.append(f"expert_quantization={config.expert_quantization}: Mixtral's experts are float")
    if len(set(config.layer_types)) != 1:
        problems.append(f"layer_types={config.layer_types}: Mixtral uses one attention type on every layer")
    if problems:
        raise ValueError("cannot export to Mixtral: " + "; ".join(problems))
    if config.router_z_loss_coef > 0:
        logger.warning(
            "router_z_loss_coef=%s is not carried over: Mixtral has no router z-loss", config.router_z_loss_coef
        )
    values = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    values["rope_parameters"] = dict(config.rope_parameters) if config.rope_parameters else None
    if config.layer_types[0] == "full_attention":
        values["sliding_window"] = None
    return MixtralConfig(**values, intermediate_size=config.moe_intermediate_size)


def from_mixtral(model_or_dir: MixtralForCausalLM | str | os.PathLike) -> MoeForCausalLM:
    """Convert a transformers Mixtral (model object or checkpoint directory with safetensors) into ours.

    Args:
        model_or_dir: a `MixtralForCausalLM`, or a local directory / Hub id of one (loaded with safetensors only).
    Returns:
        A `MoeForCausalLM` with the same weights and dtype, which computes the same logits.
    Raises:
        ValueError: the checkpoint is not a Mixtral. FileNotFoundError: the directory does not exist.
        CheckpointError (a ValueError): the checkpoint's tensors do not match its config (missing,
            unexpected, wrong shape), a file is unreadable, or it has pickle weights only.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        path = Path(model_or_dir)
        if not path.exists() and os.path.isabs(model_or_dir):
            raise FileNotFoundError(f"no Mixtral checkpoint at {path}")
        config = AutoConfig.from_pretrained(model_or_dir)
        if config.model_type != "mixtral":
            raise ValueError(f"from_mixtral needs a checkpoint with model_type 'mixtral', got {config.model_type!r}")
        model_or_dir = load_pretrained(MixtralForCausalLM, model_or_dir)
    if not isinstance(model_or_dir, MixtralForCausalLM):
        raise TypeError(f"from_mixtral takes a MixtralForCausalLM or a path, got {type(model_or_dir).__name__}")
    return _copy_weights(model_or_dir, MoeForCausalLM(mixtral_config_to_moe(model_or_dir.config)), MIXTRAL_TO_MOE_KEYS)


def to_mixtral(model: MoeForCausalLM) -> MixtralForCausalLM:
    """Convert a Mixtral-expressible `MoeForCausalLM` into transformers' `MixtralForCausalLM` (same weights).

    Serving engines that run Mixtral (vLLM, SGLang, TGI) get this; what they cannot run is refused here with the
    option named: capacity drops, expert choice and the other routers, dense layers, shared experts, biases.

    Raises:
        ValueError: the config uses an option Mixtral cannot express (see `moe_config_to_mixtral`), or the model is
            sharded (`from_pretrained(..., distributed_config=...)`).
    """
    if not isinstance(model, MoeForCausalLM):
        raise TypeError(f"to_mixtral takes a MoeForCausalLM, got {type(model).__name__}")
    if model.is_distributed_loading_by_transformers:
        raise ValueError(
            "to_mixtral takes an unsharded model; this one was sharded by from_pretrained(distributed_config=...). "
            "Save it (save_pretrained on every rank writes full tensors) and convert the folder loaded on one process"
        )
    return _copy_weights(model, MixtralForCausalLM(moe_config_to_mixtral(model.config)), MOE_TO_MIXTRAL_KEYS)


def _copy_weights(source: nn.Module, target: nn.Module, key_map) -> nn.Module:
    """`target` in the source's dtype holding the source's weights (keys renamed by `key_map`, all of them
    required), in the source's train / eval mode."""
    target = target.to(next(source.parameters()).dtype)
    state = {_rename(k, key_map): v for k, v in source.state_dict().items()}
    target.load_state_dict(state, strict=True)
    return target.eval() if not source.training else target


__all__ = ["from_mixtral", "mixtral_config_to_moe", "moe_config_to_mixtral", "to_mixtral"]
