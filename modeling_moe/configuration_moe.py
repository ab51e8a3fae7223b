"""`MoeConfig`: one flat, validated configuration for every model in this repository.

Every option of the architecture is declared here and nowhere else. Field names follow transformers' own
MoE models where one exists (`num_local_experts`, `num_experts_per_tok`, `router_aux_loss_coef`,
`output_router_logits`, `mlp_layer_types`), so code written for Mixtral reads these configs unchanged.

No field is named like a generation parameter (`top_k`, `temperature`, ...): transformers refuses to save
such configs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings

from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation import GenerationConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

from .quantized_experts import QuantizationError, check_expert_quantization

ROUTER_TYPES = ("topk_softmax", "switch", "noisy_topk", "sigmoid_grouped", "expert_choice", "soft")
CAPACITY_POLICIES = ("drop", "priority", "next_choice")
# norm_topk_prob=None means the router's own convention.
DEFAULT_NORM_TOPK_PROB = {
    "topk_softmax": True,
    "switch": False,
    "noisy_topk": True,
    "sigmoid_grouped": True,
    "expert_choice": False,
    "soft": False,
}
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# Fields with the same name and meaning in transformers' Llama / Mistral / Qwen2 / Mixtral configs: what the
# Mixtral conversion and the upcycling copy over unchanged.
TRANSFORMERS_DECODER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
)
BOOL_FIELDS = (
    "use_cache",
    "tie_word_embeddings",
    "attention_bias",
    "qkv_bias",
    "mlp_bias",
    "capacity_in_generation",
    "output_router_logits",
    "router_aux_loss_per_layer",
    "shared_expert_gate",
)


# Names other MoE families (Switch / T5X, DeepSeek, Qwen2-MoE, DBRX, OLMoE, JetMoE, ...) use for a field of ours.
# Passing one is refused with the right name: it would otherwise be kept as an unused attribute while the model
# trains with our default. (`num_experts` is an accepted alias: `attribute_map`.)
FIELD_ALIASES = {
    "top_k": "num_experts_per_tok",
    "moe_top_k": "num_experts_per_tok",
    "num_experts_per_token": "num_experts_per_tok",
    "experts_per_token": "num_experts_per_tok",
    "num_selected_experts": "num_experts_per_tok",
    "n_routed_experts": "num_local_experts",
    "num_routed_experts": "num_local_experts",
    "moe_num_experts": "num_local_experts",
    "capacity_factor": "capacity_factor_train / capacity_factor_eval",
    "train_capacity_factor": "capacity_factor_train",
    "eval_capacity_factor": "capacity_factor_eval",
    "expert_capacity": "capacity_factor_train / capacity_factor_eval",
    "n_shared_experts": "num_shared_experts",
    "decoder_sparse_step": "moe_layer_frequency",
    "moe_layer_freq": "moe_layer_frequency",
    "expert_interval": "moe_layer_frequency",
    "first_k_dense_replace": "moe_layers",
    "aux_loss_alpha": "router_aux_loss_coef",
    "aux_loss_coef": "router_aux_loss_coef",
    "load_balancing_loss_coef": "router_aux_loss_coef",
    "z_loss_coef": "router_z_loss_coef",
    "router_z_loss_coefficient": "router_z_loss_coef",
    "scoring_func": "router_type",
    "topk_method": "router_type",
    "jitter_noise": "router_jitter_noise",
    "expert_intermediate_size": "moe_intermediate_size",
}
# Keys transformers itself passes to or stores in configs (saved folders, Hub configs of older releases); they
# are not fields of ours and are not reported. Generation parameters (`max_length`, ...) are added below.
TRANSFORMERS_CONFIG_KEYS = frozenset(
    {
        "model_type",
        "auto_map",
        "torch_dtype",
        "num_labels",
        "rope_scaling",
        "rope_theta",
        "partial_rotary_factor",
        "name_or_path",
        "_name_or_path",
        "_commit_hash",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
        "_attn_implementation_internal",
        "_experts_implementation_internal",
        "_attn_implementation_autoset",
        "quantization_config",
        "use_return_dict",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "sep_token_id",
        "decoder_start_token_id",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "tie_encoder_decoder",
        "torchscript",
        "pruned_heads",
        "use_bfloat16",
        "tf_legacy_loss",
        "ignore_keys_at_rope_validation",
    }
)


class MoeConfigError(ValueError):
    """A `MoeConfig` field holds an impossible value. The message names the field and what is allowed."""


class MoeConfigWarning(UserWarning):
    """A `MoeConfig` was given keys that are not fields of ours (kept as attributes, unused by the model)."""


class MoeConfig(PreTrainedConfig):
    r"""Configuration of a decoder-only causal LM whose FFNs are dense or mixture-of-experts, layer by layer.

    Decoder (same meaning as in transformers' Llama / Mistral / Qwen2 / Mixtral configs):
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads (GQA; defaults to
        `num_attention_heads`), head_dim (defaults to `hidden_size // num_attention_heads`), hidden_act,
        max_position_embeddings, initializer_range, rms_norm_eps, rope_parameters (transformers' RoPE dict,
        e.g. `{"rope_type": "default", "rope_theta": 1e6}`), attention_dropout, tie_word_embeddings.
        sliding_window: window size in tokens, or None.
        layer_types: per-layer attention type, "full_attention" or "sliding_attention". Defaults to
            "sliding_attention" on every layer when `sliding_window` is set (Mistral), else "full_attention".

    Biases (enough to express the dense families that upcycling reads):
        attention_bias: bias on q, k, v and o (Llama's `attention_bias`).
        qkv_bias: bias on q, k and v only (Qwen2).
        mlp_bias: bias on the dense FFN's gate, up and down projections (Llama's `mlp_bias`).

    FFN sizes:
        intermediate_size: dense FFN layers.
        moe_intermediate_size: each expert; defaults to `intermediate_size`.

    Experts and which layers have them:
        num_local_experts: E, experts per MoE layer.
        num_experts_per_tok: k, experts each token is sent to.
        moe_layer_frequency: f; layer i (0-based) is MoE when (i + 1) % f == 0, as Qwen2-MoE's
            `decoder_sparse_step`: 1 = every layer, 2 = layers 1, 3, 5, ...
        moe_layers: explicit list of MoE layer indices; overrides `moe_layer_frequency`. After construction it
            always holds the resolved list, and `mlp_layer_types` (transformers' standard per-layer field) holds
            "sparse" / "dense" per layer. Passing only `mlp_layer_types` works too.

    Shared experts (DeepSeek-MoE, Qwen2-MoE):
        num_shared_experts: always-on experts next to the routed ones (0 = none), fused into one SwiGLU FFN.
        shared_expert_intermediate_size: its width; defaults to num_shared_experts * moe_intermediate_size.
        shared_expert_gate: scale the shared output by sigmoid(w . x), as Qwen2-MoE.

    Routing (see `routing.py` for the equations of each router):
        router_type: "topk_softmax" (Mixtral), "switch" (top-1, output scaled by the router probability; needs
            k = 1), "noisy_topk" (Shazeer et al. 2017), "sigmoid_grouped" (DeepSeek-V3) or "expert_choice"
            (Zhou et al. 2022; not causal, see routing.py; generation falls back to token choice).
        norm_topk_prob: renormalise the k kept weights to sum to 1; None = the router's convention (True for
            topk_softmax, noisy_topk and sigmoid_grouped; False for switch and expert_choice).
        routed_scaling_factor: multiplies the routed weights (DeepSeek-V3).
        n_group, topk_group: group-limited routing for sigmoid_grouped: experts form n_group groups, only the
            topk_group best groups are eligible.
        capacity_factor_train / capacity_factor_eval: capacity factor in training / eval mode, or None for
            dropless routing. An expert takes at most ceil(tokens * k * capacity_factor / E) assignments per
            forward pass, where tokens are the real (non-padding) tokens of the batch when an attention mask is
            given: padding is not routed under a capacity limit and never takes a slot. Expert choice uses the
            same formula (factor 1 when None).
        capacity_policy: what happens to an assignment over capacity: "drop" (GShard arrival order, first
            choices before second choices), "priority" (V-MoE batch priority routing: highest router weight
            first) or "next_choice" (try the token's next-best expert with room, drop only if none has room).
        capacity_in_generation: apply `capacity_factor_eval` inside `generate()` too. Off by default:
            capacity depends on how many tokens share a forward pass, so a cached decode step (one token)
            cannot reproduce the drops of a full forward pass, and generation would depend on the cache.
        router_jitter_noise: multiplicative uniform noise on the router input in training (Switch, Sec. 2.4).
        router_bias_update_rate: aux-loss-free balancing (DeepSeek-V3): a per-expert selection bias moved by
            this rate toward equal load once per optimizer step (`modeling_moe.balancing`); 0 = off.

    Soft MoE in the causal Mixture-of-Tokens form (router_type="soft"; Puigcerver et al. 2023, Antoniak et al.
    2023; equations in `routing.py`). A learned Phi gives E * soft_slots_per_expert slots; each slot's input is a
    softmax-weighted mix (over the tokens of a group) of the group's tokens, each token's output a softmax-weighted
    mix (over all slots) of the slot outputs. A group is G sequences of the batch at one position: batch rows
    [0, G), [G, 2G), ..., the last group smaller when the batch size is not a multiple of G. Padding has dispatch
    weight exactly 0. No token is dropped and no balancing loss applies, so router_aux_loss_coef,
    router_importance_loss_coef and router_bias_update_rate must be 0, capacity factors None, jitter 0,
    norm_topk_prob None and routed_scaling_factor 1 (z-loss is allowed). num_experts_per_tok is not used by the
    soft layer; it is the k of `soft_conversion.soft_to_topk`.
        soft_slots_per_expert: slots per expert per group (>= 1).
        soft_group_size: G in training mode (>= 1). The output of a token then depends on the other sequences of
            its group (never on other positions: the layer stays causal). Expert rows per token: E * slots / G.
        soft_eval_group_size: G in eval mode outside `generate()` (>= 1). The default 1 makes every sequence its
            own group (the dense soft mixture: dispatch weights are all 1), so eval does not depend on the other
            sequences of the batch and equals what generation computes; set it to soft_group_size to evaluate
            the training-time function instead.
        Inside `generate()` (and so in every cached decode step) G is always 1: batched generation never
        depends on the other sequences and cached equals uncached. Train / inference difference: with G > 1 in
        training, generation runs a function the model never trained on (G = 1); evaluate both (the toy
        experiment reports the gap), or convert to sparse top-k and fine-tune (`soft_conversion.soft_to_topk`).

    Losses (added to the LM loss whenever `labels` are given, padding masked by `attention_mask`):
        router_aux_loss_coef: Switch/GShard load-balancing loss weight.
        router_aux_loss_per_layer: compute that loss per MoE layer and average, instead of pooling all layers
            (pooling lets one imbalanced layer hide behind balanced ones).
        router_importance_loss_coef: Shazeer et al. 2017 importance loss, w * CV(importance)^2.
        router_z_loss_coef: ST-MoE router z-loss weight.
        output_router_logits: return router logits, final routing and drop counts by default.

    LM loss:
        lm_loss_chunk_size: None computes the (B, S, V) logits and transformers' causal-LM loss. An integer n:
            in training mode with labels, the loss comes from the last hidden states and the LM head's weight n
            positions at a time (`losses.linear_cross_entropy`), never materialising the logits; `logits` is then
            None in the output (as Liger-Kernel's fused loss does). Same loss and gradients; peak memory drops
            by about B * S * V * 4 bytes per copy of the logits. Ignored, with full logits, when the LM head is
            wrapped (peft, `modules_to_save`, device hooks, tensor parallelism) or `logits_to_keep` is set.

    Quantization:
        expert_quantization: None (float experts) or the weight-only scheme of the routed experts, set by
            `modeling_moe.quantize_experts`: {"bits": 8} (int8, per output channel) or {"bits": 4,
            "group_size": g} (int4, per group of g inputs). See `quantized_experts.py`.

    Keys that are not fields: a misspelt field (a close match, e.g. `num_expert`) or another family's name for
    one of ours (`FIELD_ALIASES`: `top_k`, `capacity_factor`, `num_experts_per_token`, ...) is refused with the
    right name; any other unknown key is kept as an attribute, as transformers does for Hub configs, and listed
    in one `MoeConfigWarning` (transformers' own keys, such as `transformers_version`, are not listed).
    A config with no MoE layer at all (`moe_layers=[]`, a frequency larger than the depth) is refused.

    Raises:
        MoeConfigError (a ValueError): a field holds an impossible value or a key is a misspelt field; the
            message names it and what is allowed.
    """

    model_type = "moe_lm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the KV cache, named `cache` from transformers 5.24
    attribute_map = {"num_experts": "num_local_experts"}
    # Sharding plans for transformers' engines (`from_pretrained(..., distributed_config=DistributedConfig(...))`),
    # Mixtral's / Qwen3-MoE's rules plus the dense-layer MLPs, the shared experts and the expert biases. The model
    # keeps the rules that name something in it and handles what the styles do not (`parallel.py`).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.gate_up_proj_bias": "packed_rowwise",  # (E, 2I): gate and up halves split alike
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",  # "moe_lm_tp_experts" with expert biases (parallel.py)
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.gate_up_proj_bias": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj_bias": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    # Decoder
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attention_dropout: float | int = 0.0
    # Biases
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    # Experts
    moe_intermediate_size: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layer_frequency: int = 1
    moe_layers: list[int] | None = None
    mlp_layer_types: list[str] | None = None
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    # Routing
    router_type: str = "topk_softmax"
    norm_topk_prob: bool | None = None
    routed_scaling_factor: float | int = 1.0
    n_group: int = 1
    topk_group: int = 1
    capacity_factor_train: float | int | None = None
    capacity_factor_eval: float | int | None = None
    capacity_policy: str = "drop"
    capacity_in_generation: bool = False
    router_jitter_noise: float | int = 0.0
    router_bias_update_rate: float | int = 0.0
    # Soft MoE (router_type="soft")
    soft_slots_per_expert: int = 1
    soft_group_size: int = 1
    soft_eval_group_size: int = 1
    # Losses
    router_aux_loss_coef: float | int = 0.001
    router_aux_loss_per_layer: bool = False
    router_importance_loss_coef: float | int = 0.0
    router_z_loss_coef: float | int = 0.0
    output_router_logits: bool = False
    # LM loss
    lm_loss_chunk_size: int | None = None
    # Quantization
    expert_quantization: dict | None = None

    def __post_init__(self, **kwargs):
        for alias, name in self.attribute_map.items():  # e.g. num_experts: validated like the field itself
            if alias in kwargs:
                setattr(self, name, kwargs.pop(alias))
        _check_unknown_keys(kwargs)
        self._validate_sizes()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.shared_expert_intermediate_size is None and isinstance(self.num_shared_experts, int):
            self.shared_expert_intermediate_size = self.num_shared_experts * self.moe_intermediate_size
        if self.layer_types is None:
            attn = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [attn] * self.num_hidden_layers
        self._resolve_moe_layers()
        self._validate()
        super().__post_init__(**kwargs)
        self._validate_rope()

    def _validate_rope(self) -> None:
        rope = self.rope_parameters
        rope_type = rope.get("rope_type") if isinstance(rope, dict) else None
        if rope_type is not None and rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise MoeConfigError(
                f"rope_parameters['rope_type'] must be 'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}, "
                f"got {rope_type!r}"
            )
        try:
            self.validate_rope()
        except (KeyError, ValueError, TypeError) as err:
            raise MoeConfigError(f"rope_parameters {rope!r} is invalid: {err}") from err
        theta = self.rope_parameters.get("rope_theta") if isinstance(self.rope_parameters, dict) else None
        if theta is not None and (not _is_number(theta) or theta <= 0):
            raise MoeConfigError(f"rope_theta (rope_parameters['rope_theta']) must be a number > 0, got {theta!r}")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' `get_config_dict`, except that a folder or repo without config.json is an error: transformers
        returns an empty dict there, which would build the default (Mixtral-8x7B-sized) config."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not config_dict:
            raise OSError(
                f"{pretrained_model_name_or_path} has no config.json (or an empty one); MoeConfig does not fall back "
                "to the default configuration. Pass a model folder, or build MoeConfig(...) explicitly"
            )
        return config_dict, kwargs

    # ------------------------------------------------------------------ derived values
    @property
    def resolved_head_dim(self) -> int:
        """Per-head size: `head_dim` if set, else `hidden_size // num_attention_heads`."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def resolved_norm_topk_prob(self) -> bool:
        """`norm_topk_prob`, or the router type's own convention when it is None."""
        if self.norm_topk_prob is not None:
            return self.norm_topk_prob
        return DEFAULT_NORM_TOPK_PROB[self.router_type]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True when decoder layer `layer_idx` (0-based) has a mixture-of-experts FFN."""
        return self.mlp_layer_types[layer_idx] == "sparse"

    def _resolve_moe_layers(self) -> None:
        n = self.num_hidden_layers
        _check_positive_int("num_hidden_layers", n)
        if self.moe_layers is not None:
            _check_layer_list("moe_layers", self.moe_layers, n)
            resolved = sorted(self.moe_layers)
        elif self.mlp_layer_types is not None:
            _check_types_list("mlp_layer_types", self.mlp_layer_types, ("sparse", "dense"), n)
            resolved = [i for i, t in enumerate(self.mlp_layer_types) if t == "sparse"]
        else:
            f = self.moe_layer_frequency
            if not isinstance(f, int) or isinstance(f, bool) or f < 1:
                raise MoeConfigError(f"moe_layer_frequency must be an integer >= 1 (1 = every layer), got {f!r}")
            resolved = [i for i in range(n) if (i + 1) % f == 0]
        types = ["sparse" if i in set(resolved) else "dense" for i in range(n)]
        if self.mlp_layer_types is not None and list(self.mlp_layer_types) != types:
            raise MoeConfigError(
                f"mlp_layer_types {self.mlp_layer_types} contradicts moe_layers {resolved}; give one of them, "
                "or make them agree"
            )
        if not resolved:
            raise MoeConfigError(
                f"the config has no MoE layer (moe_layers={self.moe_layers}, moe_layer_frequency="
                f"{self.moe_layer_frequency}, num_hidden_layers={n}); give at least one layer index in "
                f"[0, {n - 1}] or a moe_layer_frequency <= {n}"
            )
        self.moe_layers = resolved
        self.mlp_layer_types = types

    def _validate_sizes(self) -> None:
        """The sizes everything else is derived from, checked before anything is derived from them."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _check_positive_int(name, getattr(self, name))
        for name in ("num_key_value_heads", "head_dim", "moe_intermediate_size"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "num_local_experts",
            "num_experts_per_tok",
        ):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is not None:
            _check_positive_int("head_dim", self.head_dim)
        elif self.hidden_size % self.num_attention_heads != 0:
            raise MoeConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size}) "
                "when head_dim is not given; set head_dim explicitly or pick a divisor"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise MoeConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act not in ACT2FN:
            raise MoeConfigError(
                f"hidden_act must be one of transformers' activations {sorted(ACT2FN)}, got {self.hidden_act!r}"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise MoeConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_local_experts "
                f"({self.num_local_experts})"
            )
        if self.router_type not in ROUTER_TYPES:
            raise MoeConfigError(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        if self.router_type == "switch" and self.num_experts_per_tok != 1:
            raise MoeConfigError(
                f"router_type='switch' sends each token to one expert: num_experts_per_tok must be 1, "
                f"got {self.num_experts_per_tok}"
            )
        self._validate_routing()
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not _is_number(value) or not value > 0):
                raise MoeConfigError(f"{name} must be None (dropless) or a number > 0, got {value!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            _check_token_id(name, getattr(self, name), self.vocab_size)
        if not _is_number(self.attention_dropout) or not 0 <= self.attention_dropout < 1:
            raise MoeConfigError(f"attention_dropout must be a number in [0, 1), got {self.attention_dropout!r}")
        for name in (
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "router_importance_loss_coef",
            "router_bias_update_rate",
            "initializer_range",
        ):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise MoeConfigError(f"{name} must be a number >= 0, got {value!r}")
        if not _is_number(self.router_jitter_noise) or not 0 <= self.router_jitter_noise < 1:
            raise MoeConfigError(f"router_jitter_noise must be in [0, 1), got {self.router_jitter_noise!r}")
        if not _is_number(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise MoeConfigError(f"rms_norm_eps must be a number > 0, got {self.rms_norm_eps!r}")
        if self.sliding_window is not None:
            _check_positive_int("sliding_window", self.sliding_window)
        if self.lm_loss_chunk_size is not None:
            _check_positive_int("lm_loss_chunk_size", self.lm_loss_chunk_size)
        if self.expert_quantization is not None:
            try:
                check_expert_quantization(self.expert_quantization, self.hidden_size, self.moe_intermediate_size)
            except QuantizationError as err:
                raise MoeConfigError(str(err)) from err
        _check_types_list("layer_types", self.layer_types, ATTENTION_LAYER_TYPES, self.num_hidden_layers)
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise MoeConfigError("layer_types has 'sliding_attention' layers, so sliding_window must be set (> 0)")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise MoeConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.rope_parameters is not None and not isinstance(self.rope_parameters, dict):
            raise MoeConfigError(
                f"rope_parameters must be a dict such as {{'rope_type': 'default', 'rope_theta': 10000.0}}, "
                f"got {self.rope_parameters!r}"
            )

    def _validate_routing(self) -> None:
        E, k = self.num_local_experts, self.num_experts_per_tok
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise MoeConfigError(f"capacity_policy must be one of {CAPACITY_POLICIES}, got {self.capacity_policy!r}")
        if self.norm_topk_prob is not None and not isinstance(self.norm_topk_prob, bool):
            raise MoeConfigError(
                f"norm_topk_prob must be None (router default), True or False, got {self.norm_topk_prob!r}"
            )
        if not _is_number(self.routed_scaling_factor) or self.routed_scaling_factor <= 0:
            raise MoeConfigError(f"routed_scaling_factor must be a number > 0, got {self.routed_scaling_factor!r}")
        _check_positive_int("n_group", self.n_group)
        _check_positive_int("topk_group", self.topk_group)
        if self.n_group > 1 and self.router_type != "sigmoid_grouped":
            raise MoeConfigError(
                f"n_group > 1 needs router_type='sigmoid_grouped', got router_type={self.router_type!r}"
            )
        if E % self.n_group != 0:
            raise MoeConfigError(f"n_group ({self.n_group}) must divide num_local_experts ({E})")
        if self.topk_group > self.n_group:
            raise MoeConfigError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if k > self.topk_group * (E // self.n_group):
            raise MoeConfigError(
                f"num_experts_per_tok ({k}) must be <= topk_group * experts per group "
                f"({self.topk_group} * {E // self.n_group}); the selected groups hold too few experts"
            )
        self._validate_soft()
        if self.router_bias_update_rate and self.router_type == "expert_choice":
            raise MoeConfigError(
                "router_bias_update_rate > 0 (aux-loss-free balancing) needs a token-choice router; "
                "router_type='expert_choice' is balanced by construction"
            )
        if (
            not isinstance(self.num_shared_experts, int)
            or isinstance(self.num_shared_experts, bool)
            or self.num_shared_experts < 0
        ):
            raise MoeConfigError(f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        if self.num_shared_experts > 0:
            _check_positive_int("shared_expert_intermediate_size", self.shared_expert_intermediate_size)
        elif self.shared_expert_gate:
            raise MoeConfigError("shared_expert_gate=True needs num_shared_experts >= 1")

    def _validate_soft(self) -> None:
        soft_fields = ("soft_slots_per_expert", "soft_group_size", "soft_eval_group_size")
        for name in soft_fields:
            _check_positive_int(name, getattr(self, name))
        if self.router_type != "soft":
            for name in soft_fields:
                if getattr(self, name) != 1:
                    raise MoeConfigError(
                        f"{name}={getattr(self, name)} needs router_type='soft', got router_type={self.router_type!r}"
                    )
            return
        must_be = {
            "router_aux_loss_coef": 0,
            "router_importance_loss_coef": 0,
            "router_bias_update_rate": 0,
            "router_jitter_noise": 0,
            "routed_scaling_factor": 1,
            "capacity_factor_train": None,
            "capacity_factor_eval": None,
            "norm_topk_prob": None,
        }
        for name, allowed in must_be.items():
            value = getattr(self, name)
            if (value is None) != (allowed is None) or (value is not None and value != allowed):
                raise MoeConfigError(
                    f"{name} must be {allowed} with router_type='soft' (Soft MoE drops no token and needs no "
                    f"balancing: every expert processes its slots), got {value!r}"
                )


def _check_unknown_keys(kwargs: dict) -> None:
    """Refuse keys that look like a field of ours; warn once about the other keys that are not fields."""
    ours = [f.name for f in dataclasses.fields(MoeConfig) if f.name not in _BASE_FIELDS]
    candidates = {name: name for name in ours} | {a: n for a, n in MoeConfig.attribute_map.items()} | FIELD_ALIASES
    unknown = []
    for key in kwargs:
        if key in TRANSFORMERS_CONFIG_KEYS or (key in _GENERATION_KEYS and key not in FIELD_ALIASES):
            continue
        if key in FIELD_ALIASES:
            raise MoeConfigError(f"{key!r} is not a MoeConfig field; this repository calls it {FIELD_ALIASES[key]}")
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.8)
        if close:
            raise MoeConfigError(f"{key!r} is not a MoeConfig field; did you mean {candidates[close[0]]}?")
        unknown.append(key)
    if unknown:
        warnings.warn(
            f"MoeConfig got keys that are not fields of it: {sorted(unknown)}. They are kept as attributes but the "
            "model does not use them",
            MoeConfigWarning,
            stacklevel=4,
        )


def _check_token_id(name: str, value, vocab_size: int) -> None:
    values = value if isinstance(value, list) and name == "eos_token_id" else [value]
    for v in values:
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size):
            raise MoeConfigError(f"{name} must be None or a token id in [0, vocab_size={vocab_size}), got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MoeConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _check_layer_list(name: str, layers, num_layers: int) -> None:
    if not isinstance(layers, (list, tuple)):
        raise MoeConfigError(f"{name} must be a list of layer indices, got {layers!r}")
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers:
            raise MoeConfigError(f"{name} entries must be layer indices in [0, {num_layers - 1}], got {i!r}")
    if len(set(layers)) != len(layers):
        raise MoeConfigError(f"{name} has duplicate layer indices: {list(layers)}")


def _check_types_list(name: str, types, allowed: tuple[str, ...], num_layers: int) -> None:
    if not isinstance(types, (list, tuple)) or len(types) != num_layers:
        raise MoeConfigError(f"{name} must be a list with one entry per layer ({num_layers}), got {types!r}")
    bad = [t for t in types if t not in allowed]
    if bad:
        raise MoeConfigError(f"{name} entries must be in {allowed}, got {bad}")


_BASE_FIELDS = frozenset(f.name for f in dataclasses.fields(PreTrainedConfig))
_GENERATION_KEYS = frozenset(GenerationConfig._get_default_generation_params())

__all__ = ["FIELD_ALIASES", "TRANSFORMERS_DECODER_FIELDS", "MoeConfig", "MoeConfigError", "MoeConfigWarning"]
