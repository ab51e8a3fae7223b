"""What transformers' own sharding engines need from this model beyond the plans in `configuration_moe.py`.

`from_pretrained(..., distributed_config=DistributedConfig(tp_size=..., ep_size=..., fsdp_size=...))` shards the
model with transformers' tensor-, expert- and fully-sharded-parallel styles. Three things of this model are not
covered by them, and are handled here:

  * the expert biases of `mlp_bias=True` under tensor parallelism: `moe_tp_experts` sums the experts' partial
    outputs over the TP ranks, so a bias added inside the experts would be added tp_size times. The style
    `moe_lm_tp_experts` (a `moe_tp_experts` that adds the down-projection bias once, after the sum) replaces it
    when the experts have biases; the gate/up bias (E, 2I) is sharded like the gate/up weight (`packed_rowwise`:
    the gate half and the up half split alike along the last dim).
  * dropped assignments under expert parallelism: the dispatcher marks them with the sentinel index E, which
    the token exchange (`AllToAllEP`) would use as an expert rank. `remap_dropped_for_ep` sends each one to the
    first local expert of its own rank with weight 0 instead: no traffic, contributes exactly nothing (the
    expert's output is multiplied by 0, and no gradient reaches the expert or the router through it); it costs
    the FLOPs of one expert row per drop.
  * configurations no engine runs exactly are refused before anything is sharded (`check_distributed_config`).

This file travels with the model (trust_remote_code): it imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import torch
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

# Plan rules whose module exists only in some configs (dense layers, shared experts, expert biases); the
# model keeps the rules that name something in it (`prune_plan`), so transformers warns about none.
_STYLE_TP_EXPERTS = "moe_tp_experts"
_STYLE_TP_EXPERTS_WITH_BIAS = "moe_lm_tp_experts"


def prune_plan(plan: dict[str, str], names: set[str]) -> dict[str, str]:
    """The rules of `plan` (keys with `*` for a layer number) that name a module or parameter in `names` (the
    model's names with layer numbers replaced by `*`)."""
    return {key: style for key, style in plan.items() if key in names}


def wildcard_names(model: torch.nn.Module) -> set[str]:
    """Module and parameter names of `model` with every layer number replaced by `*` (as transformers' plans)."""
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    return {replace_layer_number_by_wildcard(n) for n in names}


def tp_experts_style(plan: dict[str, str], mlp_bias: bool) -> dict[str, str]:
    """`plan` with the experts' `moe_tp_experts` rule replaced by `moe_lm_tp_experts` when the experts have biases."""
    if not mlp_bias:
        return plan
    return {k: (_STYLE_TP_EXPERTS_WITH_BIAS if v == _STYLE_TP_EXPERTS else v) for k, v in plan.items()}


def check_distributed_config(config, distributed_config) -> None:
    """Refuse, naming the option, what transformers' engines cannot shard exactly for this `MoeConfig`.

    Raises:
        ValueError: a size does not divide the dimension it shards, expert choice is asked under EP, or the
            experts are quantized.
    """
    tp = distributed_config.tp_size or 1
    ep = distributed_config.ep_size or 1
    if getattr(config, "expert_quantization", None) is not None:
        raise ValueError(
            f"expert_quantization={config.expert_quantization} cannot be sharded by transformers' engines (tp_size, "
            "ep_size, fsdp_size): the integer expert weights' scales are buffers that no sharding style splits. "
            "Shard the float model, or serve the quantized one on one device"
        )
    if tp > 1:
        dims = {
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size if "dense" in config.mlp_layer_types else None,
            "shared_expert_intermediate_size": config.shared_expert_intermediate_size
            if config.num_shared_experts
            else None,
        }
        if ep == 1:  # experts are tensor-parallel only without EP (with EP each expert lives whole on a rank)
            dims["moe_intermediate_size"] = config.moe_intermediate_size
        for name, size in dims.items():
            if size is not None and size % tp:
                raise ValueError(
                    f"tensor parallelism with tp_size={tp} splits {name} ({size}) over the ranks; it must be a "
                    f"multiple of tp_size"
                )
    if ep > 1:
        if config.num_local_experts % ep:
            raise ValueError(
                f"expert parallelism with ep_size={ep} puts num_local_experts / ep_size experts on each rank; "
                f"num_local_experts ({config.num_local_experts}) must be a multiple of ep_size"
            )
        if config.router_type == "expert_choice":
            raise ValueError(
                "router_type='expert_choice' cannot run under expert parallelism (ep_size > 1): its (T, E) routing "
                "table would send every unchosen (token, expert) slot through the token exchange. Use tensor "
                "parallelism (tp_size) or FSDP (fsdp_size) for expert choice, or a token-choice router_type"
            )


def remap_dropped_for_ep(experts: torch.nn.Module, num_experts: int, ep_rank: int) -> None:
    """Wrap the expert-parallel `forward` of `experts` so that dropped assignments (index >= `num_experts`, the
    global count) go to this rank's first local expert with weight 0 instead of reaching the token exchange as
    an out-of-range expert. `experts.num_experts` is the local count after transformers' EP sharding."""
    ep_forward = experts.forward
    first_local = ep_rank * experts.num_experts

    def forward(x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        dropped_TK = indices_TK >= num_experts
        indices_TK = indices_TK.masked_fill(dropped_TK, first_local)
        weights_TK = weights_TK.masked_fill(dropped_TK, 0.0)  # already 0 from the dispatcher; kept explicit
        return ep_forward(x_TD, indices_TK, weights_TK)

    experts.forward = forward


def expert_bias_term(bias_ED: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """sum_k weights_TK[t, k] * bias_ED[indices_TK[t, k]], (T, D); dropped assignments (index E) add nothing."""
    E = bias_ED.shape[0]
    routed_TK = indices_TK < E
    b_TKD = bias_ED[indices_TK.clamp(max=E - 1)]
    w_TK = torch.where(routed_TK, weights_TK, 0).to(b_TKD.dtype)
    return torch.einsum("tk,tkd->td", w_TK, b_TKD)


if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES, _use_local_dtensor_params
    from transformers.distributed.tensor_parallel import MoeExpertsParallel

    class MoeExpertsWithBiasParallel(MoeExpertsParallel):
        """`moe_tp_experts` for experts with biases: each rank runs its slice of every expert's intermediate
        dimension (gate/up bias sharded with the weight), the partial outputs are summed over TP, and then the
        down-projection bias is added once, from the replicated routing, so its gradient is whole on every rank."""

        def transform_inputs_pre_forward(self, module, args, kwargs, mesh):
            _, indices_TK, weights_TK = args[:3]
            weights_TK = weights_TK.to_local() if isinstance(weights_TK, DTensor) else weights_TK
            module._moe_lm_tp_routing = (indices_TK, weights_TK)  # before the partial-gradient all-reduce
            return super().transform_inputs_pre_forward(module, args, kwargs, mesh)

        def context_around_forward(self, module, mesh):
            return _without_down_bias(module)

        def transform_output_post_forward(self, module, output, mesh):
            output = super().transform_output_post_forward(module, output, mesh)
            indices_TK, weights_TK = module.__dict__.pop("_moe_lm_tp_routing")
            bias = module.down_proj_bias
            bias = bias.to_local() if isinstance(bias, DTensor) else bias
            return output + expert_bias_term(bias, indices_TK, weights_TK).to(output.dtype)

    class _without_down_bias:
        """Run the experts on local tensors with `down_proj_bias` hidden (added after the TP sum instead)."""

        def __init__(self, module):
            self.module = module

        def __enter__(self):
            self.bias = self.module._parameters["down_proj_bias"]
            self.module._parameters["down_proj_bias"] = None
            self.local = _use_local_dtensor_params(self.module)
            self.local.__enter__()

        def __exit__(self, *exc):
            try:
                return self.local.__exit__(*exc)
            finally:
                self.module._parameters["down_proj_bias"] = self.bias

    if _STYLE_TP_EXPERTS_WITH_BIAS not in ALL_PARALLEL_STYLES:
        ALL_PARALLEL_STYLES.register(_STYLE_TP_EXPERTS_WITH_BIAS, MoeExpertsWithBiasParallel())


__all__ = ["check_distributed_config", "expert_bias_term", "prune_plan", "remap_dropped_for_ep", "tp_experts_style"]
