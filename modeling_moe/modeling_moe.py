"""Decoder-only causal LM whose FFN layers are dense SwiGLU or mixture-of-experts, chosen per layer.

Everything that is not MoE-specific is transformers' own machinery: Llama's RMSNorm, rotary embedding and
dense MLP, the attention-function interface (eager / sdpa / flash), the mask builders, Cache, generation,
`GradientCheckpointingLayer`, and hook-based output recording for router logits.

Shape legend: B batch, S sequence, T = B * S tokens, D hidden size, E experts, K experts per token,
H attention heads, Hkv key-value heads, d head size.

The MoE block reads as its four steps: route -> apply capacity -> experts (sorted, grouped GEMMs) -> combine.
"""

import contextlib
import inspect
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_moe import MoeConfig
from .cpu_kernels import cpu_aligned
from .experts import OUR_EXPERTS_IMPLEMENTATIONS, MoeExperts
from .losses import (
    importance_loss,
    linear_cross_entropy,
    load_balancing_loss,
    load_balancing_loss_per_layer,
    router_z_loss,
)
from .parallel import check_distributed_config, prune_plan, remap_dropped_for_ep, tp_experts_style, wildcard_names
from .quantized_experts import QuantizedMoeExperts
from .routing import (
    MoeDispatcher,
    MoeRouter,
    SoftMoeRouter,
    expert_capacity,
    from_position_groups,
    soft_combine_weights,
    soft_dispatch_weights,
    to_position_groups,
)

# The Auto classes a saved folder declares for trust_remote_code loading (file stem . class name).
HUB_AUTO_MAP = {
    "AutoConfig": "configuration_moe.MoeConfig",
    "AutoModel": "modeling_moe.MoeModel",
    "AutoModelForCausalLM": "modeling_moe.MoeForCausalLM",
    "AutoModelForSequenceClassification": "modeling_moe.MoeForSequenceClassification",
}


def _installed_cache_name() -> str:
    """The name under which the installed transformers passes the KV cache to a model and reads it back from its
    output: `cache` from 5.24 on (`past_key_values` is then a deprecated alias), `past_key_values` before.

    These files travel with saved models and run on whatever release their user has, so the convention is read off
    the installed release once, and an unknown one fails here, loudly, instead of generating wrong tokens.
    """
    fields = getattr(MoeModelOutputWithPast, "__dataclass_fields__", {})
    for name in ("cache", "past_key_values"):
        if name in fields and name in inspect.signature(create_causal_mask).parameters:
            return name
    raise ImportError(
        f"transformers {transformers.__version__} passes the KV cache under a name this model's code does not know "
        "(neither `cache` nor `past_key_values` is a field of MoeModelOutputWithPast and a parameter of "
        "create_causal_mask); install a transformers release from 5.23 to 5.24, the range this code is tested on"
    )


# "cache" or "past_key_values": the keyword this model uses towards transformers (mask builders, output fields,
# the decoder layers, whose gradient-checkpointing wrapper drops the cache under this name).
CACHE_NAME = _installed_cache_name()


def _resolve_cache(cache: Cache | None, past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The one cache of a forward call, whichever name the caller used (5.24's `generate()` passes `cache=`,
    5.23's and older user code `past_key_values=`). Both at once, or a Cache object under any other keyword (a
    future release renaming it again), is an error rather than a silently uncached decode step."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    for key, value in kwargs.items():
        if isinstance(value, Cache):
            raise TypeError(
                f"got a KV cache as `{key}=`, which this model does not read (it takes `cache`, or `past_key_values`); "
                f"transformers {transformers.__version__} may pass the cache under a new name that this model's "
                "code predates: install a transformers release from 5.23 to 5.24, the range this code is tested on"
            )
    return cache if cache is not None else past_key_values


@dataclass
class MoeModelOutput(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus the final routing of each MoE layer.

    router_indices: one (T, K) int64 tensor per MoE layer ((T, E) for expert choice): the expert each
        assignment ran on, after the capacity policy; the value E marks a dropped (or unchosen) assignment.
    dropped_tokens: one 0-d int64 tensor per MoE layer: assignments the router chose that did not run.
    """

    router_indices: tuple[torch.Tensor, ...] | None = None
    dropped_tokens: tuple[torch.Tensor, ...] | None = None


@dataclass
class MoeCausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus, when router outputs are requested, the final routing per MoE layer.

    router_indices: as in `MoeModelOutput`. dropped_tokens: (num_moe_layers,) int64 counts of dropped
        assignments (real tokens only).
    """

    router_indices: tuple[torch.Tensor, ...] | None = None
    dropped_tokens: torch.Tensor | None = None


class MoeWeightsInitializedWarning(UserWarning):
    """`from_pretrained` initialised router or expert tensors that the checkpoint lacked or held in another shape:
    the model routes with random weights. This repository's own loaders refuse such checkpoints instead
    (`modeling_moe.checkpoint.load_pretrained`)."""


class MoeMLP(nn.Module):
    """SwiGLU FFN down(act(gate(x)) * up(x)): the dense layers and the shared experts."""

    def __init__(self, config: MoeConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoeAttention(nn.Module):
    """Grouped-query attention with RoPE, optional biases (Llama / Qwen2 style) and optional sliding window."""

    def __init__(self, config: MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.resolved_head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S, D) hidden states -> (B, S, D) attention output and, for eager attention, (B, H, S, S') weights.
        The KV cache comes as `cache` (transformers >= 5.24) or `past_key_values` (older)."""
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, S, d)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, S, d)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, S, d)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            # kwargs: a paged cache (continuous batching, 5.24) fills in what its attention kernel reads
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def _shared_experts(config: MoeConfig) -> tuple[MoeMLP | None, nn.Linear | None]:
    """The always-on shared experts of an MoE block (DeepSeek-MoE; one MLP of `num_shared_experts` experts'
    width) and their optional sigmoid gate (Qwen2-MoE), or None for each."""
    if config.num_shared_experts == 0:
        return None, None
    shared = MoeMLP(config, config.shared_expert_intermediate_size)
    return shared, nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None


def _plus_shared_experts(block: nn.Module, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
    """(T, D) routed output + the block's shared-expert output for the (T, D) inputs, gated if it has a gate."""
    if block.shared_expert is None:
        return y_TD
    shared_TD = block.shared_expert(x_TD)
    if block.shared_expert_gate is not None:
        shared_TD = torch.sigmoid(block.shared_expert_gate(x_TD)) * shared_TD  # Qwen2-MoE shared gate
    return y_TD + shared_TD


class MoeSparseBlock(nn.Module):
    """Mixture-of-experts FFN: route -> dispatch (capacity) -> experts -> combine, plus optional shared experts.

    Capacity: `capacity_factor_train` applies in training mode and `capacity_factor_eval` in eval mode (None =
    dropless; expert choice then takes k/E of the tokens per expert, i.e. factor 1). Inside `generate()` routing
    is dropless token choice unless `config.capacity_in_generation` is set, because capacity counts the tokens of
    one forward pass and a cached decode step sees one token per sequence; expert choice falls back to its
    token-choice rule there (see `routing.py`). Dropped assignments contribute nothing: a token whose every
    assignment is dropped gets only the shared-expert output (zero without shared experts) and otherwise leaves
    the layer through the residual connection unchanged.
    """

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.expert_choice = config.router_type == "expert_choice"
        self.capacity_factor_train = config.capacity_factor_train
        self.capacity_factor_eval = config.capacity_factor_eval
        self.capacity_in_generation = config.capacity_in_generation
        self.in_generation = False  # set by MoeForCausalLM.generate
        self.router = MoeRouter(config)
        self.dispatcher = MoeDispatcher(config)
        # weight-only quantized experts (quantized_experts.py) when the config records a scheme
        self.experts = MoeExperts(config) if config.expert_quantization is None else QuantizedMoeExperts(config)
        self.shared_expert, self.shared_expert_gate = _shared_experts(config)

    def capacity_factor(self) -> float | None:
        """The capacity factor in force for the current mode, or None for dropless routing."""
        if self.in_generation and not self.capacity_in_generation:
            return None
        return self.capacity_factor_train if self.training else self.capacity_factor_eval

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, D) normalised hidden states, optional (B, S) bool mask of real tokens -> (B, S, D) FFN output
        (the residual is added by the layer)."""
        B, S, D = hidden_states.shape
        x_TD = hidden_states.reshape(-1, D)
        token_mask_T = token_mask.reshape(-1) if token_mask is not None else None
        capacity_factor = self.capacity_factor()
        expert_choice = self.expert_choice and not self.in_generation
        capacity = None
        if capacity_factor is not None or expert_choice:
            # A token whose router input is not finite (NaN / Inf) is routed like padding: it takes no expert
            # slot and is not counted in the capacity, so it cannot take capacity from other sequences.
            finite_T = torch.isfinite(x_TD).all(dim=-1)
            token_mask_T = finite_T if token_mask_T is None else token_mask_T & finite_T
            real_tokens = int(token_mask_T.sum())
            capacity = expert_capacity(real_tokens, self.top_k, capacity_factor or 1.0, self.num_experts)
        # 1. route
        _, weights_TK, indices_TK, choice_TE, scores_TE = self.router(
            x_TD, capacity=capacity, token_mask_T=token_mask_T, token_choice_only=not expert_choice
        )
        # 2. dispatch: the capacity policy; overflow gets the sentinel index E and weight 0
        indices_TK, weights_TK, _ = self.dispatcher(
            indices_TK, weights_TK, choice_TE, scores_TE, capacity, token_mask_T, already_dispatched=expert_choice
        )
        # 3 + 4. experts on sorted groups, weighted and summed back per token
        y_TD = self.experts(x_TD, indices_TK, weights_TK)
        y_TD = _plus_shared_experts(self, x_TD, y_TD)
        return y_TD.view(B, S, D)


class SoftMoeBlock(nn.Module):
    """Soft MoE FFN in the causal Mixture-of-Tokens form (router_type="soft"; equations in `routing.py`):
    slot logits -> group G batch rows at each position -> dispatch (softmax over the group's tokens) -> one
    experts call on all slot inputs -> combine (softmax over slots), plus optional shared experts.

    G is `soft_group_size` in training mode, `soft_eval_group_size` in eval mode and 1 inside `generate()`
    (each sequence its own group: dispatch weights are 1 and the layer is a dense soft mixture per token, so
    generation never depends on the other sequences and cached equals uncached). Padding (token_mask False) has
    dispatch weight 0. The recorded routing (`router_indices`) is every expert for every token, never a drop.
    """

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.slots_per_expert = config.soft_slots_per_expert
        self.group_size_train = config.soft_group_size
        self.group_size_eval = config.soft_eval_group_size
        self.in_generation = False  # set by MoeForCausalLM.generate
        self.router = SoftMoeRouter(config)
        self.dispatcher = MoeDispatcher(config)  # records the routing only
        self.experts = MoeExperts(config) if config.expert_quantization is None else QuantizedMoeExperts(config)
        self.shared_expert, self.shared_expert_gate = _shared_experts(config)

    def group_size(self) -> int:
        """G in force for the current mode: 1 in generation, else the training or eval group size."""
        if self.in_generation:
            return 1
        return self.group_size_train if self.training else self.group_size_eval

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, D) normalised hidden states, optional (B, S) bool mask of real tokens -> (B, S, D)."""
        B, S, D = hidden_states.shape
        x_TD = hidden_states.reshape(-1, D)
        router_logits_TE, slot_logits_TP = self.router(x_TD)
        P = slot_logits_TP.shape[-1]
        M = self.group_size()
        if token_mask is None:
            token_mask = torch.ones(B, S, dtype=torch.bool, device=hidden_states.device)
        x_NMD = to_position_groups(hidden_states, M)
        logits_NMP = to_position_groups(slot_logits_TP.view(B, S, P), M)
        mask_NM = to_position_groups(token_mask.bool(), M, fill=False)
        dispatch_NMP = soft_dispatch_weights(logits_NMP, mask_NM)  # Puigcerver et al. 2023, Eq. 1
        combine_NMP = soft_combine_weights(logits_NMP)  # Eq. 2
        slots_NPD = torch.einsum("nmp,nmd->npd", dispatch_NMP.to(x_NMD.dtype), x_NMD)  # slot inputs
        N = slots_NPD.shape[0]
        # one experts call on all N * P slot inputs: slot p runs on expert p // slots_per_expert, weight 1
        expert_R1 = (torch.arange(P, device=x_TD.device) // self.slots_per_expert).repeat(N)[:, None]
        ones_R1 = torch.ones(N * P, 1, dtype=torch.float32, device=x_TD.device)
        slot_out_NPD = self.experts(slots_NPD.reshape(N * P, D), expert_R1, ones_R1).view(N, P, D)
        y_NMD = torch.einsum("nmp,npd->nmd", combine_NMP.to(slot_out_NPD.dtype), slot_out_NPD)  # Eq. 2
        y_TD = from_position_groups(y_NMD, B, S).reshape(-1, D)
        # recorded routing: every token draws on every expert (weights: its combine mass per expert)
        indices_TE = torch.arange(self.num_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
        self.dispatcher(
            indices_TE, router_logits_TE.softmax(-1), None, None, None, token_mask.reshape(-1), already_dispatched=True
        )
        y_TD = _plus_shared_experts(self, x_TD, y_TD)
        return y_TD.view(B, S, D)


class MoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + ffn(norm(x)), the FFN dense or MoE by config."""

    def __init__(self, config: MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MoeAttention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        moe_block = SoftMoeBlock if config.router_type == "soft" else MoeSparseBlock
        self.mlp = moe_block(config) if self.is_moe else MoeMLP(config, config.intermediate_size)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        moe_token_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """(B, S, D) -> (B, S, D). `moe_token_mask` (B, S) bool marks real tokens for the MoE capacity. The KV
        cache comes as `cache` or `past_key_values` (`MoeModel` uses the installed release's name, `CACHE_NAME`,
        which transformers' gradient-checkpointing wrapper clears in training)."""
        cache = cache if cache is not None else past_key_values
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states, moe_token_mask) if self.is_moe else self.mlp(hidden_states)
        return residual + hidden_states


class MoePreTrainedModel(PreTrainedModel):
    """Weight init, attention back-ends and output recording shared by every model class of this file."""

    config_class = MoeConfig
    config: MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoeDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]  # the KV cache's name from 5.24 on, and before
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": [OutputRecorder(MoeRouter, index=0), OutputRecorder(SoftMoeRouter, index=0)],
        "router_indices": OutputRecorder(MoeDispatcher, index=0),
        "dropped_tokens": OutputRecorder(MoeDispatcher, index=2),
        "hidden_states": MoeDecoderLayer,
        "attentions": MoeAttention,
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # MoeExperts (experts.py) carries transformers' @use_experts_implementation

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Default to this repository's implementation ("eager": the fastest exact path for the inputs, see
        `experts.experts_forward`); "moe_grouped" and "moe_triton" force one of its paths; transformers' own
        implementations only where they are exact.

        transformers' other implementations do not skip dropped assignments (the sentinel index E), so they are
        refused for configs that can drop (a capacity factor) or leave assignments unchosen (expert choice).
        """
        if requested_experts is None:
            return "eager"
        if self.config.expert_quantization is not None and requested_experts != "eager":
            raise ValueError(
                f"experts_implementation={requested_experts!r} cannot run quantized experts (expert_quantization="
                f"{self.config.expert_quantization}); use 'eager'"
            )
        if requested_experts in OUR_EXPERTS_IMPLEMENTATIONS:  # exact with drops and biases (experts.py)
            return super().get_correct_experts_implementation(requested_experts)
        if self.config.mlp_bias:
            raise ValueError(
                f"experts_implementation={requested_experts!r} ignores the expert biases of mlp_bias=True; use 'eager'"
            )
        can_drop = (
            self.config.capacity_factor_train is not None
            or self.config.capacity_factor_eval is not None
            or self.config.router_type == "expert_choice"
        )
        if can_drop:
            raise ValueError(
                f"experts_implementation={requested_experts!r} does not skip dropped assignments; with "
                f"capacity_factor_train={self.config.capacity_factor_train}, capacity_factor_eval="
                f"{self.config.capacity_factor_eval}, router_type={self.config.router_type!r} use 'eager'"
            )
        return super().get_correct_experts_implementation(requested_experts)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' `from_pretrained` (same arguments and result), plus a `MoeWeightsInitializedWarning`
        naming every tensor of an MoE block (router, experts, shared experts) that was initialised at load
        because the checkpoint lacked it or held it in another shape."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        _warn_initialized_moe_tensors(model, info)
        _align_cpu_tensors(model)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, with every model class of this file in the config's `auto_map`, so
        that a Hub user can load the folder with any of the Auto classes and `trust_remote_code=True`.

        A model sharded by FSDP2 (`fully_shard`, also through `DistributedConfig(fsdp_size=...)`) has a class that
        torch generated (`FSDPMoeForCausalLM`, defined in torch's files): transformers would copy torch's files as
        the modeling code and name that class in `auto_map`. Here the files of this model's own class are written
        instead, so a sharded save (call it on every rank) gives the same folder as a single process."""
        self.config.auto_map = {**HUB_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        own_class = next(c for c in type(self).__mro__ if c.__module__ == __name__)
        if own_class is type(self) or own_class._auto_class is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        sharded_class = type(self)
        sharded_class._auto_class = None  # shadows the inherited one: transformers then copies no files itself
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del sharded_class._auto_class
        if self.should_save_on_this_rank(kwargs.get("is_main_process", True)):
            _copy_modeling_files(own_class, save_directory)
        return result

    def init_parallel_plans(self) -> None:
        """transformers' plans, keeping only the rules that name something in this model (dense-layer, shared-
        expert and expert-bias rules exist only in some configs) and, with expert biases, the experts' TP style
        that adds the down-projection bias once (`parallel.py`)."""
        super().init_parallel_plans()
        names = wildcard_names(self)
        self._tp_plan = tp_experts_style(prune_plan(self._tp_plan, names), self.config.mlp_bias)
        self._ep_plan = prune_plan(self._ep_plan, names)
        self._fsdp_plan = prune_plan(self._fsdp_plan, names)

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        """transformers' sharding, after refusing what it cannot run exactly (`parallel.check_distributed_config`);
        under expert parallelism, dropped assignments are kept out of the token exchange (`remap_dropped_for_ep`)."""
        if mesh_manager is not None:
            check_distributed_config(model.config, distributed_config)
        model = super().maybe_distribute_model(model, distributed_config, mesh_manager)
        if mesh_manager is not None and distributed_config.ep_size > 1:
            ep_rank = mesh_manager.get_mesh("ep").get_local_rank()
            for module in model.modules():
                if isinstance(module, MoeExperts) and getattr(module, "_is_expert_parallel", False):
                    remap_dropped_for_ep(module, model.config.num_local_experts, ep_rank)
        return model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            if module.gate_up_proj_bias is not None:
                init.zeros_(module.gate_up_proj_bias)
                init.zeros_(module.down_proj_bias)
        elif isinstance(module, SoftMoeRouter):
            init.normal_(module.weight, mean=0.0, std=std)  # Phi
        elif isinstance(module, MoeRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "noise_weight", None) is not None:
                init.zeros_(module.noise_weight)  # Shazeer et al. 2017 start with no noise
            if module.e_score_correction_bias is not None:
                init.zeros_(module.e_score_correction_bias)
                init.zeros_(module.load_counts)

    def update_router_biases(self) -> None:
        """One aux-loss-free balancing step for every router that has it (`router_bias_update_rate > 0`).

        Call once per optimizer step, after `optimizer.step()` (plain loops: `model.update_router_biases()`;
        Trainer: `modeling_moe.balancing.RouterBiasUpdateCallback`). The load is the one counted over the
        training forwards since the previous call, so gradient accumulation and checkpointing count each token
        once. Does nothing for routers without the bias.
        """
        for module in self.modules():
            if isinstance(module, MoeRouter):
                module.update_bias()

    def _count_router_load(self, router_indices, token_mask, router_logits=()) -> None:
        """Add this forward's routed tokens per expert to the `load_counts` of each aux-loss-free router.

        `router_indices` (and `router_logits`) have one entry per MoE block, in layer order. Every router inside a
        block counts it: a wrapper such as peft's `modules_to_save` holds the original router and its trained
        copy, and both must take the same bias steps. Padding and tokens whose router logits are not finite (a
        NaN / Inf router input) are not counted, so they never move the bias.
        """
        blocks = [m for m in self.modules() if isinstance(m, MoeSparseBlock)]
        if not router_indices:
            return
        with torch.no_grad():
            mask_T = token_mask.reshape(-1).bool() if token_mask is not None else None
            for i, (block, indices_TK) in enumerate(zip(blocks, router_indices)):
                routers = [r for r in block.router.modules() if isinstance(r, MoeRouter) and r.load_counts is not None]
                if not routers:
                    continue
                E = routers[0].num_experts
                keep_T = mask_T.to(indices_TK.device) if mask_T is not None else None
                if len(router_logits) == len(router_indices):
                    finite_T = torch.isfinite(router_logits[i]).all(dim=-1).to(indices_TK.device)
                    keep_T = finite_T if keep_T is None else keep_T & finite_T
                kept = indices_TK if keep_T is None else indices_TK[keep_T]
                counts_E = torch.bincount(kept.reshape(-1), minlength=E + 1)[:E]
                for router in routers:
                    router.load_counts += counts_E.to(router.load_counts)


def _align_cpu_tensors(model: nn.Module) -> None:
    """Give every CPU parameter and buffer off a `cpu_kernels.CPU_ALIGNMENT`-byte boundary an aligned copy.

    transformers keeps the tensors of a memory-mapped safetensors file as views into the file, at whatever offset
    its header leaves them, while a model built in memory has every tensor aligned. On some CPUs the BLAS kernels'
    bits depend on that alignment (MKL's float32 GEMV on an AMD EPYC: a one-token decode step of the reloaded
    model gave other logits than the saved model's; bench/RESULTS.md), so without this a reloaded checkpoint
    would not reproduce the model it came from. Tensor subclasses (DTensor shards) and other devices are left as
    they are; tied parameters stay tied (the Parameter object is kept, its data replaced once)."""
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is None or t.device.type != "cpu" or type(t.data) is not torch.Tensor:
                    continue
                aligned = cpu_aligned(t.data)
                if aligned.data_ptr() != t.data_ptr():
                    if isinstance(t, nn.Parameter):
                        t.data = aligned  # every module holding this Parameter sees the copy
                    else:
                        tensors[name] = aligned


def _warn_initialized_moe_tensors(model: nn.Module, loading_info: dict) -> None:
    """Warn (`MoeWeightsInitializedWarning`) about missing or wrong-shape MoE-block tensors of a load."""
    initialized = set(loading_info.get("missing_keys") or ())
    initialized |= {key for key, *_ in loading_info.get("mismatched_keys") or ()}
    blocks = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, MoeSparseBlock))
    moe = sorted(key for key in initialized if key.startswith(blocks))
    if moe:
        shown = ", ".join(moe[:8]) + (f" and {len(moe) - 8} more" if len(moe) > 8 else "")
        warnings.warn(
            f"{type(model).__name__}.from_pretrained initialised {len(moe)} router/expert tensor(s) at random "
            f"because the checkpoint lacks them or holds another shape: {shown}. The model routes with random "
            "weights; check the checkpoint (this repository's loaders refuse it)",
            MoeWeightsInitializedWarning,
            stacklevel=3,
        )


def _copy_modeling_files(model_class: type, folder) -> None:
    """Copy the file defining `model_class` and the files it imports (flat relative imports) into `folder`, as
    transformers' `custom_object_save` does for a model's own class."""
    source = sys.modules[model_class.__module__].__file__
    for path in (source, *get_relative_import_files(source)):
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))


class MoeModel(MoePreTrainedModel):
    """Embeddings, decoder layers and final norm; returns `MoeModelOutput`."""

    def __init__(self, config: MoeConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutput:
        """(B, S) token ids or (B, S, D) embeddings -> (B, S, D) final hidden states, plus the cache and,
        when requested, hidden states, attentions and raw router logits (one (T, E) tensor per MoE layer).

        The KV cache comes as `cache` (transformers >= 5.24) or `past_key_values` (its older name) and is returned
        in the output field of the installed release (`.cache`, or `.past_key_values` before 5.24)."""
        cache = _resolve_cache(cache, past_key_values, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        _check_model_inputs(self.config, input_ids, inputs_embeds, attention_mask, position_ids, cache)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if not isinstance(causal_mask_mapping := attention_mask, dict):  # generate() may have built it already
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                CACHE_NAME: cache,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        moe_token_mask = _token_mask_for_losses(attention_mask, inputs_embeds.shape[1])
        if moe_token_mask is not None:
            moe_token_mask = moe_token_mask.bool()
        for i, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                moe_token_mask=moe_token_mask,
                **{CACHE_NAME: cache},  # the name transformers' gradient-checkpointing wrapper clears
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutput(last_hidden_state=hidden_states, **{CACHE_NAME: cache})


def _check_model_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, cache) -> None:
    """Refuse malformed inputs with the argument, its shape and what was expected.

    Shapes are always checked (free, also under torch.compile). Values (token ids inside the vocabulary,
    positions >= 0) need a host sync, so they are checked in eager mode only, as `losses.linear_cross_entropy`
    does. Without a cache a 2-D attention mask must cover exactly the input; with one, the cached tokens too.
    """
    if input_ids is not None:
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(
                f"input_ids must be integer token ids of shape (batch, sequence), got {input_ids.dtype} of shape "
                f"{tuple(input_ids.shape)}"
            )
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch, sequence, hidden_size={config.hidden_size}), got "
                f"{tuple(inputs_embeds.shape)}"
            )
        shape = tuple(inputs_embeds.shape[:2])
    B, S = shape
    if B == 0 or S == 0:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(f"{name} is empty (batch, sequence) = {shape}; pass at least one sequence of one token")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        mask_shape = tuple(attention_mask.shape)
        if cache is None and mask_shape != shape:
            raise ValueError(f"attention_mask has shape {mask_shape}; without a cache it must match the input {shape}")
        if mask_shape[0] != B or mask_shape[1] < S:
            raise ValueError(f"attention_mask has shape {mask_shape}; expected (batch={B}, cached + new tokens >= {S})")
    if position_ids is not None and (
        position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != S
    ):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected (1 or batch={B}, {S})")
    if torch.compiler.is_compiling():
        return
    if input_ids is not None:
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"input_ids (shape {shape}) must be token ids in [0, vocab_size={config.vocab_size}), got values "
                f"from {low} to {high}"
            )
    if position_ids is not None and bool((position_ids < 0).any()):
        raise ValueError(f"position_ids (shape {tuple(position_ids.shape)}) must be >= 0")


def _check_labels(labels, input_shape: tuple[int, ...], vocab_size: int, ignore_index: int) -> None:
    """Labels must have the input's (batch, sequence) shape and hold ids in [0, vocab_size) or `ignore_index`
    (values checked in eager mode only)."""
    if tuple(labels.shape) != input_shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected (batch, sequence) = {input_shape}")
    if torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(
            f"labels (shape {input_shape}) must be token ids in [0, vocab_size={vocab_size}) or {ignore_index} "
            f"(ignored), got {labels[bad][:5].tolist()}"
        )


def _loss_tokens(labels, shift_labels, ignore_index: int) -> torch.Tensor:
    """How many positions the causal-LM loss averages over (0-d int64), at least 1: with every label ignored
    the loss is then 0 with zero gradient, where a plain mean would be 0 / 0 = NaN."""
    targets = shift_labels if shift_labels is not None else labels[..., 1:]
    return (targets != ignore_index).sum().clamp(min=1)


def _token_mask_for_losses(attention_mask, seq_len: int) -> torch.Tensor | None:
    """The (B, S) 0/1 mask of this forward pass's tokens, from a 2-D mask that may also cover cached tokens."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask[:, -seq_len:]
    return None  # no mask, or a prepared 4-D / dict mask: every token counts


class MoeForCausalLM(MoePreTrainedModel, GenerationMixin):
    """Causal LM head on `MoeModel`. With `labels`, the loss is

        loss = CE + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss,

    whatever `output_router_logits` says (transformers' Mixtral leaves the router losses out unless router
    logits are requested; this model does not). `aux_loss` is always returned; `router_logits` (raw logits,
    one (T, E) tensor per MoE layer) only when requested.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Trainer must not pass `num_items_in_batch`: the router losses are per-micro-batch means, so with it they
    # would be summed over accumulation steps instead of averaged. Trainer then averages the whole loss.
    accepts_loss_kwargs = False
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: MoeConfig) -> None:
        super().__init__(config)
        self.model = MoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._in_generation = False
        self.post_init()
        # DDP must not broadcast rank 0's per-step load counts over the other ranks' (they are all-reduced at
        # the bias update instead).
        self._ddp_params_and_buffers_to_ignore = [n for n, _ in self.named_buffers() if n.endswith("load_counts")]

    @contextlib.contextmanager
    def dropless_generation(self) -> Iterator[None]:
        """Context for `generate()`: MoE blocks route without capacity unless `config.capacity_in_generation`
        is set, and the forward skips router losses and routing records nobody reads (unless
        `output_router_logits` is asked for)."""
        blocks = [m for m in self.modules() if isinstance(m, (MoeSparseBlock, SoftMoeBlock))]
        previous = [b.in_generation for b in blocks], self._in_generation
        for b in blocks:
            b.in_generation = True
        self._in_generation = True
        try:
            yield
        finally:
            for b, p in zip(blocks, previous[0]):
                b.in_generation = p
            self._in_generation = previous[1]

    def generate(self, *args, **kwargs):
        """transformers' `generate()`, run under `dropless_generation()` (see `MoeSparseBlock`)."""
        with self.dropless_generation():
            return super().generate(*args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutput:
        """Args: input_ids (B, S); attention_mask (B, S) or (B, S_past + S); labels (B, S), -100 = ignored;
        cache: the KV cache (`past_key_values`, its name before transformers 5.24, is accepted too).
        Malformed inputs (ids outside the vocabulary, an empty sequence, labels, mask or positions of another
        shape) raise a ValueError naming the argument and its shape. The LM loss is the mean over the positions
        whose next-token label is not ignored; when every label is ignored it is 0, with zero gradient.

        Returns `MoeCausalLMOutput` (a `MoeCausalLMOutputWithPast`): logits (B, S or logits_to_keep, vocab;
        None in training with labels when `config.lm_loss_chunk_size` is set), loss, aux_loss (always), cache;
        with `output_router_logits`, also router_logits, router_indices and dropped_tokens per MoE layer.
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        # Router losses are always computed (aux_loss is always set), except inside generate() where nobody
        # reads them: there the routing is recorded only when asked for.
        record = output_router_logits or not self._in_generation
        outputs: MoeModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_resolve_cache(cache, past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=record,  # the router losses need them; returned only when asked
            output_router_indices=record,  # the aux-loss-free load counts need them
            output_dropped_tokens=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = aux_loss = logits = None
        if labels is not None:
            ignore_index = kwargs.get("ignore_index", -100)
            _check_labels(labels, tuple(hidden_states.shape[:2]), self.vocab_size, ignore_index)
            if kwargs.get("num_items_in_batch") is None:  # all labels ignored: loss 0, gradient 0 (not NaN)
                kwargs["num_items_in_batch"] = _loss_tokens(labels, kwargs.get("shift_labels"), ignore_index)
        if labels is not None and self._chunked_lm_loss_applies(logits_to_keep):
            loss = self._chunked_lm_loss(hidden_states, labels, **kwargs)  # no (B, S, V) logits at all
        else:
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, slice_indices, :])
            if labels is not None:
                loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        router_logits = outputs.router_logits or ()
        if record:
            token_mask = _token_mask_for_losses(attention_mask, hidden_states.shape[1])
            if self.training:
                self._count_router_load(outputs.router_indices, token_mask, router_logits)
            router_losses = self.router_losses(router_logits, token_mask)
            aux_loss = router_losses["aux"].to(hidden_states.device)
            if loss is not None:
                if torch.is_grad_enabled():
                    self._check_router_logits_carry_gradients(router_logits)
                loss = loss + router_losses["total"].to(loss.device)

        dropped = None
        if output_router_logits and outputs.dropped_tokens:
            dropped = torch.stack([d.to(hidden_states.device) for d in outputs.dropped_tokens])
        return MoeCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits if output_router_logits else None,
            router_indices=outputs.router_indices if output_router_logits else None,
            dropped_tokens=dropped,
        )

    def _check_router_logits_carry_gradients(self, router_logits) -> None:
        """Refuse a training loss whose router logits lost their autograd graph while a router is trainable: reentrant
        activation checkpointing (`use_reentrant=True`) runs each layer's first forward under `no_grad`, so the
        recorded logits, and with them the router losses, would silently train nothing."""
        if all(logits.requires_grad for logits in router_logits):
            return
        if any(p.requires_grad for m in self.modules() if isinstance(m, MoeRouter) for p in m.parameters()):
            raise RuntimeError(
                "the router logits carry no gradient, so the router losses would not train the routers; this happens "
                "with reentrant activation checkpointing: use activation_checkpointing_kwargs={'use_reentrant': False} "
                "(transformers' default)"
            )

    def _chunked_lm_loss_applies(self, logits_to_keep: int | torch.Tensor) -> bool:
        """`config.lm_loss_chunk_size` is set, the model is training, every position is kept, and the LM head is
        a plain `nn.Linear` that nothing wraps or hooks (a peft adapter or `modules_to_save` copy, accelerate's
        device hooks, tensor parallelism, FSDP): only then is `lm_head.weight` alone the head's whole function."""
        head = self.lm_head
        return (
            self.config.lm_loss_chunk_size is not None
            and self.training
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
            and type(head) is nn.Linear
            and head.bias is None
            and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"))
            and type(head.weight) in (torch.Tensor, nn.Parameter)  # not a DTensor
        )

    def _chunked_lm_loss(
        self,
        hidden_BSD: torch.Tensor,
        labels_BS: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        """transformers' `ForCausalLMLoss` (next-token labels, `ignore_index`, `num_items_in_batch`) through
        `linear_cross_entropy`, `config.lm_loss_chunk_size` positions at a time."""
        if shift_labels is None:  # position s predicts token s + 1; the last position predicts nothing
            shift_labels = nn.functional.pad(labels_BS, (0, 1), value=ignore_index)[..., 1:]
        return linear_cross_entropy(
            hidden_BSD,
            self.lm_head.weight,
            shift_labels.to(hidden_BSD.device),
            ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.config.lm_loss_chunk_size,
        )

    def router_losses(self, router_logits, token_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The router losses the config turns on, unweighted, and their weighted sum (what `forward` adds):

            total = router_aux_loss_coef * aux (pooled, or per layer with `router_aux_loss_per_layer`)
                    + router_importance_loss_coef * importance (CV^2) + router_z_loss_coef * z.

        Args:
            router_logits: one (T, E) tensor per MoE layer. token_mask: optional (B, S) mask, 0 = padding.
        Returns:
            {"aux", "importance", "z", "total"}: float32 scalar tensors (a loss whose weight is 0 is reported 0).
        """
        config = self.config
        E, k = config.num_local_experts, config.num_experts_per_tok
        balance = load_balancing_loss_per_layer if config.router_aux_loss_per_layer else load_balancing_loss
        losses = {"aux": balance(router_logits, E, k, token_mask)}
        zero = torch.zeros((), device=losses["aux"].device)
        use_importance = config.router_importance_loss_coef > 0
        losses["importance"] = importance_loss(router_logits, token_mask) if use_importance else zero
        losses["z"] = router_z_loss(router_logits, token_mask) if config.router_z_loss_coef > 0 else zero
        losses["total"] = (
            config.router_aux_loss_coef * losses["aux"]
            + config.router_importance_loss_coef * losses["importance"]
            + config.router_z_loss_coef * losses["z"]
        )
        return losses


class MoeForSequenceClassification(GenericForSequenceClassification, MoePreTrainedModel):
    """transformers' generic sequence-classification head (last non-pad token) on `MoeModel`.

    The router losses are not added to the classification loss; train with `MoeForCausalLM` for that.
    """

    def __init__(self, config: MoeConfig) -> None:
        MoePreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = MoeModel(config)  # built directly so that remote code needs no AutoModel registration
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


MoeConfig.register_for_auto_class("AutoConfig")
MoeModel.register_for_auto_class("AutoModel")
MoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MoeForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "MoeAttention",
    "MoeDecoderLayer",
    "MoeForCausalLM",
    "MoeForSequenceClassification",
    "MoeModel",
    "MoePreTrainedModel",
    "MoeSparseBlock",
    "MoeWeightsInitializedWarning",
    "SoftMoeBlock",
]
