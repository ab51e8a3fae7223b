"""Sparse upcycling: turn a dense Llama / Mistral / Qwen2 checkpoint into a `MoeForCausalLM`, streaming.

Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints") starts an MoE from a trained dense model: every weight outside the FFNs is copied, and each chosen
layer's FFN becomes E experts plus a new router. This module does that as a declarative key map (`KEY_MAP`,
`MOE_LAYER_KEYS`) plus small, separate initialisation strategies:

Experts (`EXPERT_INITS`), with the dense FFN down(act(gate x) * up x) of width I:
    copy            every expert is the dense FFN (Komatsuzaki et al. 2022, Sec. 3.1); `noise_std` > 0 adds
                    Gaussian noise of that many standard deviations of each dense matrix.
    drop_upcycling  each expert re-initialises a random fraction `drop_ratio` of its intermediate neurons (gate and
                    up rows, down columns), a different subset per expert, from N(mean, std) of the dense matrix
                    (Nakamura et al. 2025, "Drop-Upcycling", Sec. 3, Eq. 4-6).
    neuron_split    the I neurons are partitioned into E experts of I / E neurons each, at random or by balanced
                    clustering of the neurons' gate/up rows (LLaMA-MoE, Zhu et al. 2024, Sec. 3.1,
                    "Neuron-Independent"); each expert's down projection is scaled by `split_down_scale` (default E).
    shared_expert   (combinable with the three above) the dense FFN is kept as an always-on shared expert with its
                    output scaled by `shared_expert_weight` (w), the routed experts' down projections by 1 - w.

Router (`ROUTER_INITS`): zeros, normal(0, router_std), or hidden: k-means centroids of that layer's MLP inputs on
a calibration text set (mergekit's "hidden" gate initialisation, done with clustering).

What is preserved exactly (fp32, eval mode, no capacity limit): with `copy` and a router whose top-k weights sum
to 1 (topk_softmax with norm_topk_prob, noisy_topk in eval, sigmoid_grouped with routed_scaling_factor 1), each MoE
layer computes sum_k w_k FFN(x) = FFN(x), so the logits equal the dense model's whatever the router weights. The
same holds for `neuron_split` when k = E and the router is zero (w = 1 / E, down scaled by E), and for
`shared_expert` with copy experts. Switch routing (k = 1, weight = router probability p, not renormalised)
gives p(x) * FFN(x) per MoE layer: the logits change. Drop-Upcycling and noise change the function on purpose.

Memory: the conversion reads one tensor set at a time from the dense safetensors shards (`safe_open`, one file
open at a time) and writes one output shard per unit (embeddings/head, then one per decoder layer) with a
`model.safetensors.index.json`, so the peak is about one dense layer plus one upcycled layer, never the whole
model times E (see bench/bench_upcycle_memory.py). Only `router_init="hidden"` loads the dense model once, to run
the calibration text, before the streaming conversion starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .configuration_moe import ROUTER_TYPES, TRANSFORMERS_DECODER_FIELDS, MoeConfig
from .hub import atomic_directory, model_card
from .modeling_moe import HUB_AUTO_MAP, MoeForCausalLM

logger = logging.getLogger(__name__)


class UpcyclingError(ValueError):
    """An upcycling argument or dense checkpoint cannot be used. The message names the field and what is allowed."""


class DegenerateRouterWarning(UserWarning):
    """A router has (near-)equal rows: its experts receive the same tokens and, if identical, never diverge."""


# ------------------------------------------------------------------------------------------------ config map
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

# ------------------------------------------------------------------------------------------------ key map
COPY, FFN, HEAD, IGNORE = "copy", "ffn", "head", "ignore"
# Dense state-dict key -> what happens to it. First match wins; an unmatched key is an error.
#   copy:   same name and value in the MoE model (embeddings, norms, attention with its biases).
#   ffn:    layer i's dense FFN: copied unchanged when layer i stays dense, else turned into MOE_LAYER_KEYS.
#   head:   lm_head, dropped when the embeddings are tied.
#   ignore: stale buffers some old checkpoints carry.
KEY_MAP: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^model\.embed_tokens\.weight$"), COPY),
    (re.compile(r"^model\.norm\.weight$"), COPY),
    (re.compile(r"^lm_head\.weight$"), HEAD),
    (re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$"), COPY),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.[qkvo]_proj\.(weight|bias)$"), COPY),
    (re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)$"), FFN),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq$"), IGNORE),
)
# MoE layer i: the tensors under `model.layers.{i}.mlp.` and where they come from.
MOE_LAYER_KEYS = {
    "router.weight": "router init: zeros / normal / hidden, (E, D)",
    "router.noise_weight": "zeros (noisy_topk starts without noise, Shazeer et al. 2017), (E, D)",
    "router.e_score_correction_bias": "zeros (aux-loss-free bias starts neutral), (E,)",
    "experts.gate_up_proj": "expert init of gate_proj rows [0, I') and up_proj rows [I', 2I'), (E, 2I', D)",
    "experts.down_proj": "expert init of down_proj, scaled by (1 - w) with a shared expert, (E, D, I')",
    "experts.gate_up_proj_bias": "mlp_bias only: gate and up biases (of each expert's neurons after a split), (E, 2I')",
    "experts.down_proj_bias": "mlp_bias only: the down bias, scaled by (1 - w) with a shared expert, (E, D)",
    "shared_expert.gate_proj.weight": "dense gate_proj (and .bias), (I, D)",
    "shared_expert.up_proj.weight": "dense up_proj (and .bias), (I, D)",
    "shared_expert.down_proj.weight": "dense down_proj times w (and .bias times w), (D, I)",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_ZERO_INIT_SUFFIXES = ("router.noise_weight", "router.e_score_correction_bias")
EXPERT_INIT_NAMES = ("copy", "drop_upcycling", "neuron_split")
ROUTER_INIT_NAMES = ("zeros", "normal", "hidden")
SPLIT_MODES = ("random", "cluster")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def classify_key(key: str) -> tuple[str, int | None]:
    """The `KEY_MAP` rule for one dense state-dict key and its layer index (None outside the decoder layers).

    Raises:
        UpcyclingError: the key matches no rule (an architecture variant this map does not know).
    """
    for pattern, rule in KEY_MAP:
        if pattern.match(key):
            layer = _LAYER_RE.match(key)
            return rule, int(layer.group(1)) if layer else None
    raise UpcyclingError(
        f"dense checkpoint key {key!r} matches no rule of upcycling.KEY_MAP; only Llama / Mistral / Qwen2 "
        "causal-LM state dicts (embed_tokens, layers.*.self_attn/mlp/norms, norm, lm_head) are understood"
    )


# ------------------------------------------------------------------------------------------------ options
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
        if self.router_type not in ROUTER_TYPES:
            raise UpcyclingError(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
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


# ------------------------------------------------------------------------------------------------ dense config
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


# ------------------------------------------------------------------------------------------------ tensor sources
class StateDictSource:
    """Dense tensors from an in-memory model (already loaded: nothing to stream)."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach() for k, v in model.state_dict().items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every tensor."""
        return {k: tuple(v.shape) for k, v in self.state.items()}

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named tensors, on the CPU (where the output shards are assembled)."""
        return {n: self.state[n].cpu() for n in names}


class SafetensorsSource:
    """Dense tensors from a folder of safetensors shards, read on demand with `safe_open`, one file open at a time.

    Raises (at construction, before anything is written):
        FileNotFoundError: the folder has no weights, or a shard named by the index is missing.
        UpcyclingError: the folder only has pickle weights (.bin / .pt), or the index names keys a shard lacks.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (folder / SAFE_WEIGHTS_NAME).is_file():
            with safe_open(folder / SAFE_WEIGHTS_NAME, framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SAFE_WEIGHTS_NAME)
        elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise UpcyclingError(
                f"{folder} has only pickle weights (.bin/.pt); upcycling reads safetensors only (never pickle). "
                "Convert them first, e.g. load the model and save_pretrained(..., safe_serialization=True)"
            )
        else:
            raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {folder}")
        shards = sorted(set(self.weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"missing shard(s) {missing} of {folder / SAFE_WEIGHTS_INDEX_NAME}")
        self._shapes: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            with safe_open(folder / shard, framework="pt") as f:
                present = set(f.keys())
                for key in (k for k, s in self.weight_map.items() if s == shard):
                    if key not in present:
                        raise UpcyclingError(f"index says {key!r} is in shard {shard}, which does not hold it")
                    self._shapes[key] = tuple(f.get_slice(key).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every tensor (from the shard headers; no data read)."""
        return dict(self._shapes)

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named tensors, shard by shard: each shard is opened, read and closed before the next."""
        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for shard, keys in by_shard.items():
            with safe_open(self.folder / shard, framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out


# ------------------------------------------------------------------------------------------------ experts
@dataclass
class DenseFFN:
    """One dense SwiGLU FFN, y = down(act(gate x + bg) * (up x + bu)) + bd.

    gate, up: (I, D); down: (D, I); biases (I,), (I,), (D,) or None.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> DenseFFN:
        """From `{prefix}{gate,up,down}_proj.{weight,bias}` entries."""
        return cls(
            tensors[f"{prefix}gate_proj.weight"],
            tensors[f"{prefix}up_proj.weight"],
            tensors[f"{prefix}down_proj.weight"],
            tensors.get(f"{prefix}gate_proj.bias"),
            tensors.get(f"{prefix}up_proj.bias"),
            tensors.get(f"{prefix}down_proj.bias"),
        )


@dataclass
class ExpertWeights:
    """E routed experts in MoeExperts' layout: gate_up (E, 2I', D) [rows 0..I' gate, I'..2I' up], down (E, D, I'),
    and with a biased dense FFN (Llama `mlp_bias`) gate_up_bias (E, 2I') and down_bias (E, D)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _expert_biases(ffn: DenseFFN, parts: Sequence[torch.Tensor] | None, num_experts: int):
    """Expert biases from the dense FFN's: every expert copies them, or with a neuron split (`parts`) expert e takes
    the gate/up biases of its neurons P_e; the down bias is copied whole (the 1/E-weighted experts sum to it)."""
    if ffn.gate_bias is None:
        return None, None
    if parts is None:
        gate_up_bias = torch.cat([ffn.gate_bias, ffn.up_bias]).expand(num_experts, -1).contiguous()  # (E, 2I)
    else:
        gate_up_bias = torch.stack([torch.cat([ffn.gate_bias[p], ffn.up_bias[p]]) for p in parts])  # (E, 2I/E)
    return gate_up_bias, ffn.down_bias.expand(num_experts, -1).contiguous()  # (E, D)


def copy_experts(ffn: DenseFFN, num_experts: int) -> ExpertWeights:
    """Every expert is the dense FFN (Komatsuzaki et al. 2022, Sec. 3.1): (I, D) x 3 -> (E, 2I, D), (E, D, I)."""
    I, D = ffn.gate.shape
    gate_up = torch.empty(num_experts, 2 * I, D, dtype=ffn.gate.dtype)  # (E, 2I, D), filled in place: no temporary
    gate_up[:, :I] = ffn.gate
    gate_up[:, I:] = ffn.up
    down = ffn.down.unsqueeze(0).expand(num_experts, -1, -1).contiguous()  # (E, D, I)
    return ExpertWeights(gate_up, down, *_expert_biases(ffn, None, num_experts))


def add_noise(experts: ExpertWeights, ffn: DenseFFN, noise_std: float, generator: torch.Generator) -> ExpertWeights:
    """W_e + noise_std * std(W) * N(0, 1), independently per expert and entry, std(W) of the dense matrix."""
    I = ffn.gate.shape[0]
    scale_gu = torch.cat([ffn.gate.float().std().expand(I), ffn.up.float().std().expand(I)])[
        None, :, None
    ]  # (1, 2I, 1)
    gate_up = experts.gate_up.float() + noise_std * scale_gu * _randn(experts.gate_up.shape, generator)
    down = experts.down.float() + noise_std * ffn.down.float().std() * _randn(experts.down.shape, generator)
    return ExpertWeights(
        gate_up.to(experts.gate_up.dtype), down.to(experts.down.dtype), experts.gate_up_bias, experts.down_bias
    )


def _randn(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def drop_upcycle_experts(ffn: DenseFFN, num_experts: int, ratio: float, generator: torch.Generator) -> ExpertWeights:
    """Drop-Upcycling (Nakamura et al. 2025, Sec. 3, Eq. 4-6): start from copies, then for each expert pick a random
    subset S_e of round(ratio * I) intermediate neurons (independently per expert) and re-draw their gate and up
    rows and down columns from N(mean(W), std(W)^2), the statistics of the whole dense matrix W.

    Returns:
        ExpertWeights (E, 2I, D) / (E, D, I), the dense dtype.
    """
    I, D = ffn.gate.shape
    n_drop = round(ratio * I)
    stats = [(w.float().mean(), w.float().std()) for w in (ffn.gate, ffn.up, ffn.down)]
    experts = copy_experts(ffn, num_experts)
    gate_up, down = experts.gate_up, experts.down
    for e in range(num_experts):
        idx = torch.randperm(I, generator=generator)[:n_drop]  # S_e, a different subset per expert
        (mg, sg), (mu, su), (md, sd) = stats
        gate_up[e, idx] = (mg + sg * _randn((n_drop, D), generator)).to(gate_up.dtype)  # gate rows
        gate_up[e, I + idx] = (mu + su * _randn((n_drop, D), generator)).to(gate_up.dtype)  # up rows
        down[e][:, idx] = (md + sd * _randn((D, n_drop), generator)).to(down.dtype)  # down columns
    return ExpertWeights(gate_up, down, experts.gate_up_bias, experts.down_bias)  # biases copied, not re-drawn


def neuron_partition(ffn: DenseFFN, num_experts: int, mode: str, generator: torch.Generator) -> list[torch.Tensor]:
    """Partition the I intermediate neurons into E equal sets (LLaMA-MoE, Zhu et al. 2024, Sec. 3.1).

    mode "random": a random permutation cut into E blocks. mode "cluster": balanced k-means on each neuron's
    normalised [gate row, up row] (neurons that read the input alike go to the same expert).

    Returns:
        E sorted int64 index tensors of I / E neurons each, disjoint, covering 0..I-1.
    """
    I = ffn.gate.shape[0]
    m = I // num_experts
    if mode == "random":
        perm = torch.randperm(I, generator=generator)
        return [perm[e * m : (e + 1) * m].sort().values for e in range(num_experts)]
    features = torch.nn.functional.normalize(torch.cat([ffn.gate.float(), ffn.up.float()], dim=1), dim=1)  # (I, 2D)
    labels = balanced_kmeans(features, num_experts, generator)
    return [torch.nonzero(labels == e).squeeze(1) for e in range(num_experts)]


def neuron_split_experts(
    ffn: DenseFFN, num_experts: int, mode: str, down_scale: float, generator: torch.Generator
) -> ExpertWeights:
    """Neuron split (LLaMA-MoE, Zhu et al. 2024, Sec. 3.1): expert e keeps the neurons P_e of the dense FFN, so
    sum_e down[:, P_e] h[P_e] = FFN(x); each expert's down projection is scaled by `down_scale` (E makes the
    average of the E experts with weights 1 / E equal to the dense FFN).

    Returns:
        ExpertWeights (E, 2I/E, D) / (E, D, I/E), the dense dtype.
    """
    parts = neuron_partition(ffn, num_experts, mode, generator)
    gate_up = torch.stack([torch.cat([ffn.gate[p], ffn.up[p]], dim=0) for p in parts])  # (E, 2I/E, D)
    down = torch.stack([(ffn.down[:, p].float() * down_scale).to(ffn.down.dtype) for p in parts])  # (E, D, I/E)
    return ExpertWeights(gate_up, down, *_expert_biases(ffn, parts, num_experts))


def balanced_kmeans(x_ND: torch.Tensor, k: int, generator: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Balanced k-means: Lloyd iterations whose assignment step gives every cluster exactly N / k points, greedily
    by increasing distance (N divisible by k).

    Args:
        x_ND: points, (N, D) float32.
    Returns:
        labels (N,) int64 in [0, k), each value exactly N / k times.
    """
    N = x_ND.shape[0]
    capacity = N // k
    centroids = _kmeans_pp(x_ND, k, generator)
    labels = torch.full((N,), -1, dtype=torch.long)
    for _ in range(iters):
        dist_NK = torch.cdist(x_ND, centroids)
        new = torch.full((N,), -1, dtype=torch.long)
        load = [0] * k
        for flat in torch.argsort(dist_NK.reshape(-1), stable=True).tolist():
            i, c = divmod(flat, k)
            if new[i] < 0 and load[c] < capacity:
                new[i] = c
                load[c] += 1
        if torch.equal(new, labels):
            break
        labels = new
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x_ND) / capacity
    return labels


def _kmeans_pp(x_ND: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): (k, D) centroids drawn from the points, spread out."""
    N = x_ND.shape[0]
    chosen = [int(torch.randint(N, (1,), generator=generator))]
    d2_N = ((x_ND - x_ND[chosen[0]]) ** 2).sum(dim=1)
    for _ in range(1, k):
        if float(d2_N.sum()) > 0:
            nxt = int(torch.multinomial(d2_N, 1, generator=generator))
        else:  # every point coincides with a centroid: duplicates are unavoidable
            nxt = int(torch.randint(N, (1,), generator=generator))
        chosen.append(nxt)
        d2_N = torch.minimum(d2_N, ((x_ND - x_ND[nxt]) ** 2).sum(dim=1))
    return x_ND[chosen].clone()


def shared_expert_tensors(ffn: DenseFFN, weight: float) -> dict[str, torch.Tensor]:
    """The dense FFN as the shared expert, its output scaled by `weight` (down weight and bias times w): suffix ->
    tensor under `mlp.shared_expert.`."""
    out = {"gate_proj.weight": ffn.gate, "up_proj.weight": ffn.up}
    out["down_proj.weight"] = ffn.down if weight == 1.0 else (ffn.down.float() * weight).to(ffn.down.dtype)
    if ffn.gate_bias is not None:
        out["gate_proj.bias"] = ffn.gate_bias
        out["up_proj.bias"] = ffn.up_bias
        out["down_proj.bias"] = (
            ffn.down_bias if weight == 1.0 else (ffn.down_bias.float() * weight).to(ffn.down_bias.dtype)
        )
    return out


def _copy_init(ffn: DenseFFN, o: UpcycleOptions, generator: torch.Generator) -> ExpertWeights:
    experts = copy_experts(ffn, o.num_experts)
    return add_noise(experts, ffn, o.noise_std, generator) if o.noise_std > 0 else experts


def _drop_init(ffn: DenseFFN, o: UpcycleOptions, generator: torch.Generator) -> ExpertWeights:
    return drop_upcycle_experts(ffn, o.num_experts, o.drop_ratio, generator)


def _split_init(ffn: DenseFFN, o: UpcycleOptions, generator: torch.Generator) -> ExpertWeights:
    scale = o.split_down_scale if o.split_down_scale is not None else float(o.num_experts)
    return neuron_split_experts(ffn, o.num_experts, o.split_mode, scale, generator)


# expert_init name -> strategy (dense FFN, options, generator) -> ExpertWeights
EXPERT_INITS: dict[str, Callable[[DenseFFN, UpcycleOptions, torch.Generator], ExpertWeights]] = {
    "copy": _copy_init,
    "drop_upcycling": _drop_init,
    "neuron_split": _split_init,
}


def init_experts(ffn: DenseFFN, options: UpcycleOptions, generator: torch.Generator) -> ExpertWeights:
    """Apply `EXPERT_INITS[options.expert_init]`, then scale the routed down projections by 1 - shared_expert_weight
    when a shared expert carries that share of the output."""
    experts = EXPERT_INITS[options.expert_init](ffn, options, generator)
    if options.shared_expert and options.shared_expert_weight != 0.0:
        routed = 1.0 - options.shared_expert_weight
        experts.down = (experts.down.float() * routed).to(experts.down.dtype)
        if experts.down_bias is not None:
            experts.down_bias = (experts.down_bias.float() * routed).to(experts.down_bias.dtype)
    return experts


# ------------------------------------------------------------------------------------------------ router
def zeros_router(num_experts: int, hidden_size: int, **_) -> torch.Tensor:
    """All-zero router: equal weights 1 / E for every token; top-k ties go to the lowest indices. (E, D)."""
    return torch.zeros(num_experts, hidden_size)


def normal_router(num_experts: int, hidden_size: int, *, std: float, generator: torch.Generator, **_) -> torch.Tensor:
    """Router rows drawn from N(0, std^2), as a freshly initialised MoE. (E, D) float32."""
    return std * _randn((num_experts, hidden_size), generator)


# router_init name -> strategy (E, D, std=, generator=) -> (E, D); "hidden" is `hidden_state_router` on the
# calibration inputs (see `hidden_routers`).
ROUTER_INITS: dict[str, Callable[..., torch.Tensor]] = {"zeros": zeros_router, "normal": normal_router}


def hidden_state_router(
    x_ND: torch.Tensor, num_experts: int, generator: torch.Generator, scale: float = 1.0, iters: int = 50
) -> torch.Tensor:
    """Router rows from k-means centroids of a layer's MLP inputs, so that at step 0 the router's dot product
    picks the nearest centroid (mergekit's "hidden" gate init, done with clustering).

    Centring without a router bias: with u the unit mean direction, P = 1 - u u^T projects it out. The projected
    inputs P x have mean P mean = 0 (centred), and for any row c orthogonal to u, c . x = c . P x exactly. The
    inputs z = P x / |P x| are clustered by spherical k-means into unit centroids c_e (orthogonal to u), and the
    router row is W_e = scale * c_e / median|P x|, so argmax_e W_e . x = argmax_e c_e . z (nearest centroid) and a
    typical token's best logit is about `scale`.

    Args:
        x_ND: MLP inputs (post-attention-norm hidden states), (N, D), N >= E.
        num_experts: E. generator: seeds k-means++. scale: logit scale of a typical token.
    Returns:
        W (E, D) float32.
    Raises:
        UpcyclingError: fewer than E inputs with a component off the mean direction.
    """
    x = x_ND.float()
    mean_D = x.mean(dim=0)
    u_D = mean_D / mean_D.norm().clamp_min(1e-12)
    z = x - (x @ u_D)[:, None] * u_D  # P x, centred
    norms_N = z.norm(dim=1)
    keep = norms_N > 1e-6 * norms_N.max().clamp_min(1e-30)
    if int(keep.sum()) < num_experts:
        raise UpcyclingError(
            f"router_init='hidden' needs at least num_experts ({num_experts}) calibration tokens with distinct "
            f"hidden states, got {int(keep.sum())}; give more calibration_texts"
        )
    z = z[keep] / norms_N[keep, None]
    centroids_ED = spherical_kmeans(z, num_experts, generator, iters)
    centroids_ED = centroids_ED - (centroids_ED @ u_D)[:, None] * u_D  # exactly orthogonal to u (rounding)
    centroids_ED = torch.nn.functional.normalize(centroids_ED, dim=1)
    return centroids_ED * (scale / norms_N[keep].median())


def spherical_kmeans(z_ND: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """Spherical k-means (cosine similarity) with k-means++ seeding on unit vectors; an empty cluster keeps its
    previous centroid.

    Args:
        z_ND: unit vectors (N, D). Returns: unit centroids (k, D).
    """
    centroids = _kmeans_pp(z_ND, k, generator)
    for _ in range(iters):
        labels = (z_ND @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, z_ND)
        counts = torch.bincount(labels, minlength=k)
        new = torch.where(counts[:, None] > 0, torch.nn.functional.normalize(sums, dim=1), centroids)
        if torch.allclose(new, centroids, atol=1e-7):
            break
        centroids = new
    return centroids


def degenerate_router_pairs(weight_ED: torch.Tensor, tol: float = 0.1) -> list[tuple[int, int]]:
    """Pairs of experts whose router rows are near-equal: |w_i - w_j| <= tol * mean_e |w_e| (an all-zero router
    has every pair). Such experts get the same tokens; copies of the same FFN then never diverge."""
    w = weight_ED.float()
    scale = float(w.norm(dim=1).mean())
    dist = torch.cdist(w, w)
    E = w.shape[0]
    return [(i, j) for i in range(E) for j in range(i + 1, E) if float(dist[i, j]) <= tol * scale]


def _warn_if_degenerate(weight_ED: torch.Tensor, layer_idx: int, router_init: str) -> None:
    pairs = degenerate_router_pairs(weight_ED)
    if pairs:
        warnings.warn(
            f"layer {layer_idx}: router (router_init={router_init!r}) is degenerate, near-equal rows for expert "
            f"pairs {pairs[:8]}{' ...' if len(pairs) > 8 else ''}; those experts receive the same tokens (with copy "
            "init they then stay identical). Use router_init='normal', or 'hidden' with more varied calibration text",
            DegenerateRouterWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------ calibration
def calibration_batches(texts: Sequence[str], tokenizer, max_tokens: int, max_length: int = 512) -> list[torch.Tensor]:
    """Tokenise texts one by one (no padding) until `max_tokens` tokens: a list of (1, S) id tensors."""
    batches, total = [], 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        if ids.shape[1] == 0:
            continue
        ids = ids[:, : max_tokens - total]
        batches.append(ids)
        total += ids.shape[1]
        if total >= max_tokens:
            break
    return batches


@torch.no_grad()
def collect_mlp_inputs(
    model: PreTrainedModel, batches: Sequence[torch.Tensor], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Run the dense model on `batches` and record each listed layer's MLP input (the post-attention RMSNorm
    output). Returns layer -> (N, D) float32, N the number of calibration tokens."""
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    decoder_layers = model.get_decoder().layers
    hooks = [
        decoder_layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]).float())
        )
        for i in layers
    ]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids.to(model.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {i: torch.cat(v) for i, v in captured.items()}


def hidden_routers(
    dense: PreTrainedModel | Path, texts: Sequence[str] | None, tokenizer, options: UpcycleOptions
) -> dict[int, torch.Tensor]:
    """Router weights (E, D) for every MoE layer from calibration text (`router_init="hidden"`).

    Raises:
        UpcyclingError: no calibration texts, no tokenizer, or too few tokens.
    """
    if not texts:
        raise UpcyclingError("router_init='hidden' needs calibration_texts (a list of strings)")
    if tokenizer is None:
        raise UpcyclingError("router_init='hidden' needs a tokenizer (an object or a path) for the calibration_texts")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    batches = calibration_batches(texts, tokenizer, options.calibration_max_tokens)
    model = (
        dense
        if isinstance(dense, PreTrainedModel)
        else AutoModelForCausalLM.from_pretrained(dense, use_safetensors=True)
    )
    inputs = collect_mlp_inputs(model, batches, options.moe_layers)
    del model
    return {
        i: hidden_state_router(x, options.num_experts, _generator(options.seed, i), options.router_scale)
        for i, x in inputs.items()
    }


# ------------------------------------------------------------------------------------------------ conversion
def _generator(seed: int, layer_idx: int) -> torch.Generator:
    """A generator per (seed, layer): the same layer gets the same draws whatever else is converted."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer_idx + 1)


@dataclass
class UpcyclePlan:
    """Everything decided before a byte is written: the configs, the options and the dense keys per output unit."""

    dense_config: object
    config: MoeConfig
    options: UpcycleOptions
    units: list[tuple[str, list[str]]]  # (unit name, dense keys), embeddings/head first, then one per layer
    expected: dict[str, tuple[int, ...]]  # MoE key -> shape, the keys the output must hold
    routers: dict[int, torch.Tensor] = field(default_factory=dict)  # hidden-state router rows per MoE layer


def _expected_dense_shapes(dense_config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(dense_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _expected_moe_shapes(config: MoeConfig) -> tuple[MoeForCausalLM, dict[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = MoeForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return model, shapes


def make_plan(
    dense_config, shapes: Mapping[str, tuple[int, ...]], options: UpcycleOptions, overrides: Mapping
) -> UpcyclePlan:
    """Validate options, config and the dense keys / shapes, and group the dense keys into output units.

    Raises:
        UpcyclingError: a bad option, unsupported architecture or unknown key; a missing or mis-shaped tensor.
    """
    dense_family(dense_config)
    mlp_bias = bool(getattr(dense_config, "mlp_bias", False))
    options = options.validate(dense_config.num_hidden_layers, dense_config.intermediate_size, mlp_bias)
    config = moe_config_from_dense(dense_config, options, **overrides)
    want = _expected_dense_shapes(dense_config)
    tied = bool(dense_config.tie_word_embeddings)
    missing = sorted(k for k in want if k not in shapes and not (tied and k == "lm_head.weight"))
    if missing:
        raise UpcyclingError(f"dense checkpoint lacks {len(missing)} tensor(s) its config needs, e.g. {missing[:5]}")
    units: dict[str, list[str]] = {"embeddings": []}
    units.update({f"layer {i}": [] for i in range(dense_config.num_hidden_layers)})
    for key, shape in shapes.items():
        rule, layer = classify_key(key)
        if rule == IGNORE or (rule == HEAD and tied):
            continue
        if key not in want:
            raise UpcyclingError(f"dense checkpoint key {key!r} is not part of the model its config describes")
        if tuple(shape) != want[key]:
            raise UpcyclingError(f"dense tensor {key!r} has shape {tuple(shape)}, its config implies {want[key]}")
        units["embeddings" if layer is None else f"layer {layer}"].append(key)
    _, expected = _expected_moe_shapes(config)
    return UpcyclePlan(dense_config, config, options, list(units.items()), expected)


def convert_unit(plan: UpcyclePlan, name: str, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One output unit: the embeddings/head, or decoder layer i with its FFN kept dense or turned into an MoE.

    Args:
        dense: dense key -> tensor for this unit. Returns: MoE key -> tensor (contiguous, dense dtype).
    """
    out = {k: v for k, v in dense.items() if classify_key(k)[0] in (COPY, HEAD)}
    if not name.startswith("layer "):
        return out
    i = int(name.split()[1])
    ffn_keys = {k: v for k, v in dense.items() if classify_key(k)[0] == FFN}
    if i not in plan.options.moe_layers:
        out.update(ffn_keys)  # dense layer: FFN unchanged
        return out
    prefix = f"model.layers.{i}.mlp."
    ffn = DenseFFN.from_tensors(ffn_keys, prefix)
    return {**out, **moe_layer_tensors(plan, i, ffn)}


def moe_layer_tensors(plan: UpcyclePlan, layer_idx: int, ffn: DenseFFN) -> dict[str, torch.Tensor]:
    """`MOE_LAYER_KEYS` of one MoE layer from its dense FFN: router, experts, optional shared expert and zeros."""
    options, config = plan.options, plan.config
    E, D = options.num_experts, config.hidden_size
    dtype = ffn.gate.dtype
    prefix = f"model.layers.{layer_idx}.mlp."
    generator = _generator(options.seed, layer_idx)
    if options.router_init == "hidden":
        router = plan.routers[layer_idx]
    else:
        std = options.router_std if options.router_std is not None else config.initializer_range
        router = ROUTER_INITS[options.router_init](E, D, std=std, generator=generator)
    _warn_if_degenerate(router, layer_idx, options.router_init)
    experts = init_experts(ffn, options, torch.Generator().manual_seed(generator.initial_seed() + 7919))
    out = {
        prefix + "router.weight": router.to(dtype),
        prefix + "experts.gate_up_proj": experts.gate_up.contiguous(),
        prefix + "experts.down_proj": experts.down.contiguous(),
    }
    if experts.gate_up_bias is not None:
        out[prefix + "experts.gate_up_proj_bias"] = experts.gate_up_bias.contiguous()
        out[prefix + "experts.down_proj_bias"] = experts.down_bias.contiguous()
    if options.shared_expert:
        out.update(
            {
                prefix + "shared_expert." + k: v
                for k, v in shared_expert_tensors(ffn, options.shared_expert_weight).items()
            }
        )
    for suffix in _ZERO_INIT_SUFFIXES:
        if prefix + suffix in plan.expected:
            out[prefix + suffix] = torch.zeros(plan.expected[prefix + suffix], dtype=dtype)
    return out


def _write_unit(plan: UpcyclePlan, tensors: dict[str, torch.Tensor], path: Path) -> tuple[int, list[str]]:
    """Check one unit against the expected keys and shapes and save it as one shard; return its bytes and keys.
    Everything the unit allocated is released when this returns (the caller keeps no reference)."""
    for k, t in tensors.items():
        if plan.expected.get(k) != tuple(t.shape):
            raise RuntimeError(f"upcycling produced {k!r} with shape {tuple(t.shape)}, expected {plan.expected.get(k)}")
    save_file({k: t.contiguous() for k, t in tensors.items()}, path, metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values()), list(tensors)


def write_shards(plan: UpcyclePlan, source, folder: Path, progress: bool = False) -> int:
    """Convert unit by unit, each to its own safetensors shard, then write the index.

    Returns:
        total bytes of tensor data written.
    Raises:
        RuntimeError: a produced tensor is not what `MoeForCausalLM` expects (a bug in the key map).
    """
    from tqdm.auto import tqdm

    n = len(plan.units)
    weight_map: dict[str, str] = {}
    total = 0
    for u, (name, keys) in enumerate(tqdm(plan.units, desc="upcycling", unit="shard", disable=not progress)):
        shard = f"model-{u + 1:05d}-of-{n:05d}.safetensors"
        size, written = _write_unit(plan, convert_unit(plan, name, source.read(keys)), folder / shard)
        total += size
        weight_map.update(dict.fromkeys(written, shard))
    missing = sorted(set(plan.expected) - set(weight_map))
    if missing:
        raise RuntimeError(f"upcycling wrote no tensor for {missing[:5]}")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return total


def _describe(plan: UpcyclePlan, base_model: str | None) -> str:
    o, c = plan.options, plan.config
    init = {
        "copy": f"copies of the dense FFN{f' plus Gaussian noise of {o.noise_std} std' if o.noise_std else ''} "
        "(Komatsuzaki et al. 2022)",
        "drop_upcycling": f"Drop-Upcycling with ratio {o.drop_ratio} (Nakamura et al. 2025)",
        "neuron_split": f"a {o.split_mode} neuron split of the dense FFN into {o.num_experts} experts of "
        f"{c.moe_intermediate_size} neurons (LLaMA-MoE, Zhu et al. 2024)",
    }[o.expert_init]
    shared = (
        f" The dense FFN is kept as an always-on shared expert weighted {o.shared_expert_weight}."
        if o.shared_expert
        else ""
    )
    return (
        f"Sparse upcycling of `{base_model or 'a dense model'}` with `modeling_moe.upcycle`: the FFNs of layers "
        f"{list(o.moe_layers)} became {o.num_experts} experts ({o.num_experts_per_tok} per token, "
        f"`{o.router_type}` routing), initialised as {init}; router init `{o.router_init}`, seed {o.seed}.{shared} "
        "Every other weight and configuration field is the dense model's."
    )


def _write_side_files(plan, folder: Path, name: str, dense, tokenizer, base_model: str | None) -> None:
    """config.json (with auto_map), the modeling files, generation config, tokenizer and README.md."""
    meta_model, _ = _expected_moe_shapes(plan.config)
    config = plan.config
    custom_object_save(meta_model, folder, config=config)  # modeling_moe.py and its flat imports
    config.auto_map = dict(HUB_AUTO_MAP)
    config.save_pretrained(folder)  # also copies configuration_moe.py
    if isinstance(dense, Path) and (dense / "generation_config.json").is_file():
        shutil.copyfile(dense / "generation_config.json", folder / "generation_config.json")
    elif isinstance(dense, PreTrainedModel) and dense.generation_config is not None:
        dense.generation_config.save_pretrained(folder)
    else:
        GenerationConfig.from_model_config(config).save_pretrained(folder)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    elif isinstance(dense, Path):
        for file in TOKENIZER_FILES:
            if (dense / file).is_file():
                shutil.copyfile(dense / file, folder / file)
    card = model_card(
        meta_model,
        name,
        base_model=base_model,
        description=_describe(plan, base_model),
        extra_tags=("sparse-upcycling", plan.options.expert_init.replace("_", "-")),
    )
    (folder / "README.md").write_text(card)


def _open_dense(dense_model_or_dir) -> tuple[object, object, PreTrainedModel | Path]:
    """(dense config, tensor source, model object or folder path) of the input.

    Raises:
        FileNotFoundError: no such folder or no config.json. UpcyclingError: unsupported input or architecture.
    """
    if isinstance(dense_model_or_dir, PreTrainedModel):
        dense_family(dense_model_or_dir.config)
        return dense_model_or_dir.config, StateDictSource(dense_model_or_dir), dense_model_or_dir
    if not isinstance(dense_model_or_dir, (str, os.PathLike)):
        raise UpcyclingError(
            "dense_model_or_dir must be a transformers causal LM or a checkpoint folder, "
            f"got {type(dense_model_or_dir).__name__}"
        )
    folder = Path(dense_model_or_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no dense checkpoint at {folder}: config.json not found (local folders only)")
    config = AutoConfig.from_pretrained(folder)
    dense_family(config)
    return config, SafetensorsSource(folder), folder


def _default_base_model(dense_config, dense) -> str | None:
    name = getattr(dense_config, "_name_or_path", "") or ""
    if name and not os.path.isabs(name) and not Path(name).exists():
        return name  # looks like a Hub id
    return Path(dense).name if isinstance(dense, Path) else None


# ------------------------------------------------------------------------------------------------ public API
def upcycle_to_folder(
    dense_model_or_dir: PreTrainedModel | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    tokenizer=None,
    calibration_texts: Sequence[str] | None = None,
    base_model: str | None = None,
    config_overrides: Mapping | None = None,
    progress: bool = False,
    **options,
) -> Path:
    """Upcycle a dense checkpoint straight into a Hub-ready folder, streaming (never the whole model in memory).

    Args: as `upcycle` (the `options` are `UpcycleOptions` fields).
    Returns:
        The finished folder: safetensors shards (one per decoder layer) + index, config.json with auto_map, the
        modeling files, generation_config.json, the tokenizer (given, or copied from the dense folder) and README.md.
    Raises:
        UpcyclingError / FileNotFoundError / FileExistsError before anything is written; on any error the
        output folder is left as it was (absent, or the old one when overwriting).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; pass overwrite=True to replace it")
    unknown = sorted(set(options) - set(UpcycleOptions.__dataclass_fields__))
    if unknown:
        raise UpcyclingError(
            f"unknown upcycling option(s) {unknown}; allowed: {sorted(UpcycleOptions.__dataclass_fields__)}"
        )
    dense_config, source, dense = _open_dense(dense_model_or_dir)
    plan = make_plan(dense_config, source.shapes(), UpcycleOptions(**options), config_overrides or {})
    if plan.options.router_init == "hidden":
        if tokenizer is None and isinstance(dense, Path):
            tokenizer = dense
        plan.routers = hidden_routers(dense, calibration_texts, tokenizer, plan.options)
    base_model = base_model or _default_base_model(dense_config, dense)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_shards(plan, source, tmp, progress=progress)
        _write_side_files(plan, tmp, out.name, dense, tokenizer, base_model)
    return out


def upcycle(
    dense_model_or_dir: PreTrainedModel | str | os.PathLike,
    *,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    router_type: str = "topk_softmax",
    moe_layers: str | Sequence[int] = "all",
    expert_init: str = "copy",
    noise_std: float = 0.0,
    drop_ratio: float = 0.5,
    split_mode: str = "random",
    split_down_scale: float | None = None,
    shared_expert: bool = False,
    shared_expert_weight: float = 0.5,
    router_init: str = "normal",
    router_std: float | None = None,
    router_scale: float = 1.0,
    calibration_texts: Sequence[str] | None = None,
    calibration_max_tokens: int = 4096,
    tokenizer=None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    seed: int = 0,
    base_model: str | None = None,
    config_overrides: Mapping | None = None,
    progress: bool = False,
) -> MoeForCausalLM:
    """Turn a dense Llama / Mistral / Qwen2 causal LM into a `MoeForCausalLM` (sparse upcycling).

    Args:
        dense_model_or_dir: a transformers `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM`, or a
            local folder of one with safetensors weights (single file or sharded with an index).
        num_experts: E experts per MoE layer. num_experts_per_tok: k <= E.
        router_type: a `MoeConfig.router_type`; "switch" needs k = 1 and scales each output by the router
            probability (not function-preserving, see the module docstring).
        moe_layers: "all", "every_other" (layers 1, 3, 5, ...) or a list of layer indices; other layers keep
            their dense FFN unchanged.
        expert_init: "copy", "drop_upcycling" or "neuron_split" (see the module docstring).
        noise_std: with "copy", add N(0, (noise_std * std(W))^2) noise per expert, std(W) of each dense matrix.
        drop_ratio: Drop-Upcycling's r, the fraction of each expert's intermediate neurons re-initialised.
        split_mode: "random" or "cluster" (balanced k-means) for "neuron_split".
        split_down_scale: multiplier on each split expert's down projection; None = E.
        shared_expert: keep the dense FFN as an always-on shared expert. shared_expert_weight: its share w of the
            output; routed experts' down projections are scaled by 1 - w (w = 1: routed experts start silent).
        router_init: "zeros", "normal" (std `router_std`, default the dense initializer_range) or "hidden"
            (k-means on the MLP inputs of `calibration_texts`, logit scale `router_scale`).
        calibration_texts, calibration_max_tokens, tokenizer: calibration for "hidden" (the tokenizer defaults to
            the dense folder's); `tokenizer` is also saved into `out_dir`.
        out_dir: when given, the Hub-ready folder is written there (atomically); overwrite: replace an existing one.
        seed: seeds every random choice (per layer, so a layer's draws do not depend on the others).
        base_model: Hub id written to the model card (default: the dense config's name or folder name).
        config_overrides: extra `MoeConfig` fields (capacity factors, loss weights, ...).
        progress: show a tqdm bar over the output shards.
    Returns:
        The upcycled `MoeForCausalLM` in eval mode, in the dense dtype, on the CPU. Returning it means holding the
        whole MoE in memory; for models larger than memory use `upcycle_to_folder` (or `python -m training.upcycle`),
        which only streams.
    Raises:
        UpcyclingError (a ValueError) naming the bad option or checkpoint field; FileNotFoundError for a missing
        folder or shard; FileExistsError when `out_dir` exists and `overwrite` is False. Nothing is left behind.
    """
    options = dict(
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        router_type=router_type,
        moe_layers=moe_layers if isinstance(moe_layers, str) else tuple(moe_layers),
        expert_init=expert_init,
        noise_std=noise_std,
        drop_ratio=drop_ratio,
        split_mode=split_mode,
        split_down_scale=split_down_scale,
        shared_expert=shared_expert,
        shared_expert_weight=shared_expert_weight,
        router_init=router_init,
        router_std=router_std,
        router_scale=router_scale,
        calibration_max_tokens=calibration_max_tokens,
        seed=seed,
    )
    kwargs = dict(
        tokenizer=tokenizer,
        calibration_texts=calibration_texts,
        base_model=base_model,
        config_overrides=config_overrides,
        progress=progress,
        **options,
    )
    if out_dir is not None:
        folder = upcycle_to_folder(dense_model_or_dir, out_dir, overwrite=overwrite, **kwargs)
        return MoeForCausalLM.from_pretrained(folder).eval()
    with tempfile.TemporaryDirectory(prefix="upcycle-") as tmp:
        folder = upcycle_to_folder(dense_model_or_dir, Path(tmp) / "moe", **kwargs)
        model = MoeForCausalLM.from_pretrained(folder).eval()
        for t in [*model.parameters(), *model.buffers()]:  # own the memory: the folder is deleted on return
            t.data = t.data.clone()
        return model


__all__ = [
    "KEY_MAP",
    "MOE_LAYER_KEYS",
    "SUPPORTED_FAMILIES",
    "DegenerateRouterWarning",
    "UpcycleOptions",
    "UpcyclingError",
    "add_noise",
    "balanced_kmeans",
    "copy_experts",
    "degenerate_router_pairs",
    "drop_upcycle_experts",
    "hidden_state_router",
    "moe_config_from_dense",
    "neuron_partition",
    "neuron_split_experts",
    "normal_router",
    "resolve_moe_layers",
    "spherical_kmeans",
    "upcycle",
    "upcycle_to_folder",
    "zeros_router",
]
