"""Decoder-only causal LM whose FFN layers are dense SwiGLU or mixture-of-experts, chosen per layer.

Everything that is not MoE-specific is transformers' own machinery: Llama's RMSNorm, rotary embedding and
dense MLP, the attention-function interface (eager / sdpa / flash), the mask builders, Cache, generation,
`GradientCheckpointingLayer`, and hook-based output recording for router logits.

Shape legend: B batch, S sequence, T = B * S tokens, D hidden size, E experts, K experts per token,
H attention heads, Hkv key-value heads, d head size.

The MoE block reads as its four steps: route -> apply capacity -> experts (sorted, grouped GEMMs) -> combine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
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
from .experts import MoeExperts
from .losses import load_balancing_loss, router_z_loss
from .routing import MoeRouter, capacity_keep_mask, expert_capacity

# The Auto classes a saved folder declares for trust_remote_code loading (file stem . class name).
HUB_AUTO_MAP = {
    "AutoConfig": "configuration_moe.MoeConfig",
    "AutoModel": "modeling_moe.MoeModel",
    "AutoModelForCausalLM": "modeling_moe.MoeForCausalLM",
    "AutoModelForSequenceClassification": "modeling_moe.MoeForSequenceClassification",
}


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
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S, D) hidden states -> (B, S, D) attention output and, for eager attention, (B, H, S, S') weights."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, S, d)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, S, d)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, S, d)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

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


class MoeSparseBlock(nn.Module):
    """Mixture-of-experts FFN: route -> capacity -> experts -> combine.

    Capacity: `capacity_factor_train` applies in training mode and `capacity_factor_eval` in eval mode (None =
    dropless). Inside `generate()` routing is dropless unless `config.capacity_in_generation` is set, because
    capacity counts the tokens of one forward pass and a cached decode step sees one token per sequence.
    Dropped assignments contribute nothing: a token whose every assignment is dropped gets a zero FFN output and
    leaves the layer through the residual connection unchanged.
    """

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.capacity_factor_train = config.capacity_factor_train
        self.capacity_factor_eval = config.capacity_factor_eval
        self.capacity_in_generation = config.capacity_in_generation
        self.in_generation = False  # set by MoeForCausalLM.generate
        self.router = MoeRouter(config)
        self.experts = MoeExperts(config)

    def capacity_factor(self) -> float | None:
        """The capacity factor in force for the current mode, or None for dropless routing."""
        if self.training:
            return self.capacity_factor_train
        if self.in_generation and not self.capacity_in_generation:
            return None
        return self.capacity_factor_eval

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, S, D) normalised hidden states -> (B, S, D) FFN output (the residual is added by the layer)."""
        B, S, D = hidden_states.shape
        x_TD = hidden_states.reshape(-1, D)
        # 1. route
        _, weights_TK, indices_TK = self.router(x_TD)
        # 2. capacity: overflowing assignments get the sentinel index E and are skipped by the experts
        capacity_factor = self.capacity_factor()
        if capacity_factor is not None:
            capacity = expert_capacity(x_TD.shape[0], self.top_k, capacity_factor, self.num_experts)
            keep_TK = capacity_keep_mask(indices_TK, capacity, self.num_experts)
            indices_TK = indices_TK.masked_fill(~keep_TK, self.num_experts)
        # 3 + 4. experts on sorted groups, weighted and summed back per token
        y_TD = self.experts(x_TD, indices_TK, weights_TK)
        return y_TD.view(B, S, D)


class MoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + ffn(norm(x)), the FFN dense or MoE by config."""

    def __init__(self, config: MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MoeAttention(config, layer_idx)
        self.mlp = MoeSparseBlock(config) if config.is_moe_layer(layer_idx) else LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """(B, S, D) -> (B, S, D)."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class MoePreTrainedModel(PreTrainedModel):
    """Weight init, attention back-ends and output recording shared by every model class of this file."""

    config_class = MoeConfig
    config: MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(MoeRouter, index=0),
        "hidden_states": MoeDecoderLayer,
        "attentions": MoeAttention,
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, with every model class of this file in the config's `auto_map`, so
        that a Hub user can load the folder with any of the Auto classes and `trust_remote_code=True`."""
        self.config.auto_map = {**HUB_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MoeRouter):
            init.normal_(module.weight, mean=0.0, std=std)


class MoeModel(MoePreTrainedModel):
    """Embeddings, decoder layers and final norm; returns `MoeModelOutputWithPast`."""

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
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        """(B, S) token ids or (B, S, D) embeddings -> (B, S, D) final hidden states, plus the cache and,
        when requested, hidden states, attentions and raw router logits (one (T, E) tensor per MoE layer)."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if not isinstance(causal_mask_mapping := attention_mask, dict):  # generate() may have built it already
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "past_key_values": past_key_values,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for i, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


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
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MoeConfig) -> None:
        super().__init__(config)
        self.model = MoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @contextlib.contextmanager
    def dropless_generation(self) -> Iterator[None]:
        """Context in which MoE blocks route without capacity unless `config.capacity_in_generation` is set."""
        blocks = [m for m in self.modules() if isinstance(m, MoeSparseBlock)]
        previous = [b.in_generation for b in blocks]
        for b in blocks:
            b.in_generation = True
        try:
            yield
        finally:
            for b, p in zip(blocks, previous):
                b.in_generation = p

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
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        """Args: input_ids (B, S); attention_mask (B, S) or (B, S_past + S); labels (B, S), -100 = ignored.
        Returns `MoeCausalLMOutputWithPast` with logits (B, S or logits_to_keep, vocab), loss, aux_loss, cache."""
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=True,  # the router losses need them; returned only when asked
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        router_logits = outputs.router_logits or ()
        token_mask = _token_mask_for_losses(attention_mask, hidden_states.shape[1])
        aux_loss = load_balancing_loss(
            router_logits, self.config.num_local_experts, self.config.num_experts_per_tok, token_mask
        ).to(logits.device)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            loss = loss + self.config.router_aux_loss_coef * aux_loss
            if self.config.router_z_loss_coef > 0:
                loss = loss + self.config.router_z_loss_coef * router_z_loss(router_logits, token_mask).to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits if output_router_logits else None,
        )


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
]
