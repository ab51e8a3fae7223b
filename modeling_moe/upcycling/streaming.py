"""The streaming conversion: the plan, the shard writer and the side files of the output folder.

`make_plan` checks every option, the config and the dense keys / shapes before a byte is written, and groups the
dense keys into output units (embeddings/head, then one per decoder layer). `write_shards` converts unit by unit
(`convert_unit`, with `MOE_LAYER_KEYS` for an MoE layer) and writes each as its own safetensors shard plus the index,
so the peak is about one dense layer plus one upcycled layer. `write_side_files` adds config.json with auto_map, the
modeling files, the generation config, the tokenizer and the model card.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from ..configuration_moe import MoeConfig
from ..hub import model_card
from ..modeling_moe import HUB_AUTO_MAP, MoeForCausalLM
from .checkpoint import COPY, FFN, HEAD, IGNORE, classify_key
from .expert_init import DenseFFN, init_experts, shared_expert_tensors
from .families import dense_family, moe_config_from_dense
from .options import UpcycleOptions, UpcyclingError, layer_generator
from .router_init import ROUTER_INITS, warn_if_degenerate

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
_ZERO_INIT_SUFFIXES = ("router.noise_weight", "router.e_score_correction_bias")
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
    generator = layer_generator(options.seed, layer_idx)
    if options.router_init == "hidden":
        router = plan.routers[layer_idx]
    else:
        std = options.router_std if options.router_std is not None else config.initializer_range
        router = ROUTER_INITS[options.router_init](E, D, std=std, generator=generator)
    warn_if_degenerate(router, layer_idx, options.router_init)
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


def write_side_files(plan, folder: Path, name: str, dense, tokenizer, base_model: str | None) -> None:
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
