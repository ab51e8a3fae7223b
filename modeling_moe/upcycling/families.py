"""Dense-family detection and the dense config -> `MoeConfig` map (Llama, Mistral, Qwen2).

`SUPPORTED_FAMILIES` says, per dense `model_type`, which config fields are copied verbatim, which values the
architecture fixes in code (`constants`) and which fields are already folded into the copied ones (`derived`). A
dense config that sets any other field away from its default is refused: dropping it would change the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..configuration_moe import TRANSFORMERS_DECODER_FIELDS, MoeConfig
from .options import UpcycleOptions, UpcyclingError

# Dense config fields copied verbatim into MoeConfig (same name on both sides). Missing any of these silently
# changes the model, so the list is checked against the dense config (see `_check_unknown_fields`).
COMMON_CONFIG_FIELDS = (*TRANSFORMERS_DECODER_FIELDS, "intermediate_size")


@dataclass(frozen=True)
class DenseFamily:
    """How one dense architecture maps onto `MoeConfig`.

    fields: dense config fields copied to the MoeConfig field of the same name.
    constants: MoeConfig fields the architecture fixes in its code rather than its config.
    derived: dense config fields already folded into `fields` (not copied, but understood).
    """

    fields: tuple[str, ...]
    constants: Mapping[str, object] = field(default_factory=dict)
    derived: tuple[str, ...] = ()


SUPPORTED_FAMILIES: dict[str, DenseFamily] = {
    "llama": DenseFamily((*COMMON_CONFIG_FIELDS, "attention_bias", "mlp_bias"), derived=("pretraining_tp",)),
    "mistral": DenseFamily((*COMMON_CONFIG_FIELDS, "sliding_window")),
    # Qwen2 hard-codes bias on q, k, v (not o); use_sliding_window / max_window_layers are folded into
    # sliding_window (None when off) and layer_types by Qwen2Config itself.
    "qwen2": DenseFamily(
        (*COMMON_CONFIG_FIELDS, "sliding_window", "layer_types"),
        constants={"qkv_bias": True},
        derived=("use_sliding_window", "max_window_layers"),
    ),
}

# Fields that describe the file or the runtime, not the function the model computes.
METADATA_FIELDS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "_attn_implementation_autoset",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "finetuning_task",
    }
)
# Understood fields with the only value upcycling reproduces.
REQUIRED_VALUES = {"pretraining_tp": 1}


def dense_family(config) -> tuple[str, DenseFamily]:
    """The supported family of a dense transformers config.

    Raises:
        UpcyclingError: the model_type is not one of `SUPPORTED_FAMILIES`.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise UpcyclingError(
            f"unsupported architecture: model_type {model_type!r}; upcycling supports {sorted(SUPPORTED_FAMILIES)}"
        )
    return model_type, SUPPORTED_FAMILIES[model_type]


def _check_unknown_fields(config, family: DenseFamily) -> None:
    """Refuse a dense config that sets a field upcycling does not carry over (it would silently change the model)."""
    defaults = type(config)().to_dict()
    understood = set(family.fields) | set(family.derived) | METADATA_FIELDS | set(REQUIRED_VALUES)
    for name, value in config.to_dict().items():
        if name in REQUIRED_VALUES and value != REQUIRED_VALUES[name]:
            raise UpcyclingError(
                f"dense config field {name}={value!r} is not supported; it must be {REQUIRED_VALUES[name]!r}"
            )
        if name not in understood and defaults.get(name, object()) != value:
            raise UpcyclingError(
                f"dense config field {name}={value!r} is not carried over by upcycling (known fields: "
                f"{sorted(family.fields)}); dropping it would change the model"
            )


def moe_config_from_dense(dense_config, options: UpcycleOptions, **overrides) -> MoeConfig:
    """The `MoeConfig` of the upcycled model: every field the dense config knows, plus the MoE choices.

    Args:
        dense_config: a Llama / Mistral / Qwen2 config. options: validated `UpcycleOptions`.
        overrides: further MoeConfig fields (capacity factors, loss weights, ...); fields copied from the dense
            config or set by the options cannot be overridden.
    Returns:
        The MoeConfig (dtype set to the dense config's).
    Raises:
        UpcyclingError: unsupported architecture, an unknown dense field, or an override of a copied field.
    """
    _, family = dense_family(dense_config)
    _check_unknown_fields(dense_config, family)
    values = {name: getattr(dense_config, name, None) for name in family.fields}
    if values["rope_parameters"] is not None:
        values["rope_parameters"] = dict(values["rope_parameters"])
    values.update(family.constants)
    E = options.num_experts
    I = dense_config.intermediate_size
    values.update(
        num_local_experts=E,
        num_experts_per_tok=options.num_experts_per_tok,
        router_type=options.router_type,
        moe_layers=list(options.moe_layers),
        moe_intermediate_size=I // E if options.expert_init == "neuron_split" else I,
        num_shared_experts=1 if options.shared_expert else 0,
        shared_expert_intermediate_size=I if options.shared_expert else None,
        architectures=["MoeForCausalLM"],
    )
    clash = sorted(set(overrides) & set(values))
    if clash:
        raise UpcyclingError(
            f"config overrides {clash} would replace values copied from the dense model or set by the options"
        )
    config = MoeConfig(**values, **overrides)
    dtype = getattr(dense_config, "dtype", None)
    if dtype is not None:
        config.dtype = dtype
    return config
