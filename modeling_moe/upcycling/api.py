"""The public entry points: `upcycle` (returns the model) and `upcycle_to_folder` (streams into a Hub-ready folder)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import PreTrainedModel

from ..checkpoint import load_pretrained
from ..hub import atomic_directory, check_disjoint
from ..modeling_moe import MoeForCausalLM
from .checkpoint import open_dense
from .options import UpcycleOptions, UpcyclingError
from .router_init import hidden_routers
from .streaming import make_plan, write_shards, write_side_files


def _default_base_model(dense_config, dense) -> str | None:
    name = getattr(dense_config, "_name_or_path", "") or ""
    if name and not os.path.isabs(name) and not Path(name).exists():
        return name  # looks like a Hub id
    return Path(dense).name if isinstance(dense, Path) else None


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
    if isinstance(dense_model_or_dir, (str, os.PathLike)):  # never replace (or write into) the input
        check_disjoint(dense_model_or_dir, out, "dense checkpoint", "out_dir")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; pass overwrite=True to replace it")
    unknown = sorted(set(options) - set(UpcycleOptions.__dataclass_fields__))
    if unknown:
        raise UpcyclingError(
            f"unknown upcycling option(s) {unknown}; allowed: {sorted(UpcycleOptions.__dataclass_fields__)}"
        )
    dense_config, source, dense = open_dense(dense_model_or_dir)
    plan = make_plan(dense_config, source.shapes(), UpcycleOptions(**options), config_overrides or {})
    if plan.options.router_init == "hidden":
        if tokenizer is None and isinstance(dense, Path):
            tokenizer = dense
        plan.routers = hidden_routers(dense, calibration_texts, tokenizer, plan.options)
    base_model = base_model or _default_base_model(dense_config, dense)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_shards(plan, source, tmp, progress=progress)
        write_side_files(plan, tmp, out.name, dense, tokenizer, base_model)
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
            probability (not function-preserving, see `modeling_moe.upcycling`).
        moe_layers: "all", "every_other" (layers 1, 3, 5, ...) or a list of layer indices; other layers keep
            their dense FFN unchanged.
        expert_init: "copy", "drop_upcycling" or "neuron_split" (see `modeling_moe.upcycling`).
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
        return load_pretrained(MoeForCausalLM, folder).eval()
    with tempfile.TemporaryDirectory(prefix="upcycle-") as tmp:
        folder = upcycle_to_folder(dense_model_or_dir, Path(tmp) / "moe", **kwargs)
        model = load_pretrained(MoeForCausalLM, folder).eval()
        for t in [*model.parameters(), *model.buffers()]:  # own the memory: the folder is deleted on return
            t.data = t.data.clone()
        return model
