"""Soft MoE -> sparse top-k: the same experts under a token-choice router initialised from Phi (the "transition
tuning" of Mixture of Tokens, Antoniak et al. 2023, Sec. 4), for cheap inference after a short fine-tune.

At G = 1 a soft layer gives token x the combine mass p_e(x) = softmax_e(logsumexp_s x . Phi_{e,s}) per expert
(`routing.SoftMoeRouter`). The top-k router gets W_e = mean_s Phi_{e,s}: with one slot per expert that is exact
(with k = E and renormalised weights the converted model computes exactly the soft model at G = 1); with more
slots it is the linear approximation of the logsumexp (equal when an expert's slot logits agree). With k < E the
dropped experts' mass is renormalised away, hence the fine-tune (README, "Soft MoE").

Does not travel to the Hub (nothing of the model imports it).
"""

from __future__ import annotations

import torch

from .configuration_moe import MoeConfig, MoeConfigError
from .modeling_moe import MoeForCausalLM

SOFT_FIELDS = ("soft_slots_per_expert", "soft_group_size", "soft_eval_group_size")


def soft_to_topk_config(config: MoeConfig, top_k: int | None = None, router_aux_loss_coef: float = 0.001) -> MoeConfig:
    """The top-k config for a soft config: router_type "topk_softmax", k = `top_k` (default
    `config.num_experts_per_tok`), renormalised top-k weights, a Switch balancing loss for the fine-tune.

    Raises:
        MoeConfigError: `config` is not a soft config, or top_k is not in [1, E].
    """
    if config.router_type != "soft":
        raise MoeConfigError(f"router_type must be 'soft' to convert to top-k, got {config.router_type!r}")
    k = config.num_experts_per_tok if top_k is None else top_k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= config.num_local_experts:
        raise MoeConfigError(f"top_k must be an integer in [1, {config.num_local_experts}], got {k!r}")
    fields = config.to_dict()
    for name in (*SOFT_FIELDS, "auto_map", "architectures"):
        fields.pop(name, None)
    fields.update(router_type="topk_softmax", num_experts_per_tok=k, router_aux_loss_coef=router_aux_loss_coef)
    return MoeConfig.from_dict(fields)


@torch.no_grad()
def soft_to_topk(
    model: MoeForCausalLM, top_k: int | None = None, router_aux_loss_coef: float = 0.001
) -> MoeForCausalLM:
    """A new `MoeForCausalLM` with `model`'s weights and a top-k router per MoE layer initialised from Phi:
    router.weight[e] = mean over expert e's slots of Phi (E, D). Every other tensor is copied unchanged.

    Args:
        model: a `MoeForCausalLM` with router_type="soft". top_k: experts per token (default the config's
            `num_experts_per_tok`). router_aux_loss_coef: balancing loss of the new model (for its fine-tune).
    Returns:
        The converted model, in `model`'s dtype and device, in eval mode.
    """
    config = soft_to_topk_config(model.config, top_k, router_aux_loss_coef)
    E, n = config.num_local_experts, model.config.soft_slots_per_expert
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".mlp.router.weight"):  # Phi (E * n, D), slot p of expert p // n
            tensor = tensor.view(E, n, -1).mean(dim=1)
        state[name] = tensor
    param = next(model.parameters())
    converted = MoeForCausalLM(config).to(device=param.device, dtype=param.dtype)
    converted.load_state_dict(state, strict=True)
    return converted.eval()


__all__ = ["soft_to_topk", "soft_to_topk_config"]
