"""Cost of a model: parameters per component (total and active), weight memory, and measured throughput.

Throughput is measured on the current device for a forward pass and for greedy generation, with transformers'
`MixtralForCausalLM` of the same shape measured in the same run, interleaved round by round so that both see
the same machine load. When the model is Mixtral-expressible the reference carries the same weights
(`modeling_moe.convert.to_mixtral`); otherwise it is a Mixtral with the same hidden size d, expert FFN size f,
experts E, experts per token k, layers and attention shape, every layer MoE, random weights, and the result says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel

from modeling_moe import MoeConfig, MoeForCausalLM, count_parameters
from modeling_moe.accounting import weight_bytes
from modeling_moe.convert import moe_config_to_mixtral, to_mixtral

from .loading import EvalInputError

BYTES_PER_PARAM = {"bf16": 2, "fp32": 4}


def local_moe_config(model: PreTrainedModel) -> MoeConfig:
    """This repository's `MoeConfig` for a model loaded with our class or with a folder's own (remote) code."""
    if isinstance(model.config, MoeConfig):
        return model.config
    values = model.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype"):
        values.pop(key, None)
    return MoeConfig(**values)


def as_local_moe(model: PreTrainedModel) -> MoeForCausalLM:
    """The model as this repository's `MoeForCausalLM` (the same object, or a copy of a remote-code model)."""
    if isinstance(model, MoeForCausalLM):
        return model
    local = MoeForCausalLM(local_moe_config(model)).to(next(model.parameters()).dtype)
    local.load_state_dict(model.state_dict(), strict=True)
    return local.eval()


def unique_parameters(model: torch.nn.Module) -> int:
    """Number of parameters, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


def parameter_report(model: PreTrainedModel) -> dict:
    """Total and active parameters per component, and the memory the weights take.

    Returns:
        {"total": {component: n}, "active": {component: n}, "total_params", "active_params",
        "weight_memory_bytes": {"bf16": bytes, "fp32": bytes} (all weights in that dtype),
        "loaded_weight_bytes": {"total": bytes, "components": {component: bytes}} (the weights as loaded, in
        their real dtypes: int8 / int4 quantized experts with their scales count what they take),
        "expert_quantization": the config's scheme or None}; components only for MoE models of this
        repository (`modeling_moe.accounting.count_parameters`), otherwise one "all" component.
    """
    if getattr(model.config, "model_type", None) == "moe_lm":
        counts = count_parameters(local_moe_config(model))
        total, active = dict(counts.total), dict(counts.active)
        loaded = weight_bytes(model)
    else:
        n = unique_parameters(model)
        total, active = {"all": n}, {"all": n}
        loaded = {"all": sum(p.numel() * p.element_size() for p in model.parameters())}
    n_total = sum(total.values())
    return {
        "total": total,
        "active": active,
        "total_params": n_total,
        "active_params": sum(active.values()),
        "weight_memory_bytes": {name: n_total * size for name, size in BYTES_PER_PARAM.items()},
        "loaded_weight_bytes": {"total": sum(loaded.values()), "components": loaded},
        "expert_quantization": getattr(model.config, "expert_quantization", None),
    }


def reference_mixtral(model: PreTrainedModel) -> tuple[MixtralForCausalLM, str]:
    """transformers' Mixtral to time against, and a sentence saying what it is.

    Raises:
        EvalInputError: the model is not an MoE model of this repository.
    """
    if getattr(model.config, "model_type", None) != "moe_lm":
        raise EvalInputError("model: the Mixtral speed reference needs an MoE model of this repository")
    config = local_moe_config(model)
    dtype = next(model.parameters()).dtype
    try:
        moe_config_to_mixtral(config)
    except ValueError as err:
        mixtral = MixtralConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.resolved_head_dim,
            max_position_embeddings=config.max_position_embeddings,
            num_local_experts=config.num_local_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            tie_word_embeddings=config.tie_word_embeddings,
        )
        reference = MixtralForCausalLM(mixtral).to(device=next(model.parameters()).device, dtype=dtype).eval()
        note = (
            f"{err}. Reference: a transformers Mixtral with the same d={config.hidden_size}, "
            f"f={config.moe_intermediate_size}, E={config.num_local_experts}, k={config.num_experts_per_tok}, "
            f"{config.num_hidden_layers} layers (all MoE, dropless), random weights"
        )
        return reference, note
    reference = to_mixtral(as_local_moe(model)).to(next(model.parameters()).device).eval()
    return reference, "transformers MixtralForCausalLM with the same weights (modeling_moe.convert.to_mixtral)"


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_timing(variants: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict:
    """Time each variant once per round, the order rotated every round, after one warm-up call each.

    Returns:
        {name: [seconds per round]}.
    """
    for fn in variants.values():
        fn()
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(rounds), desc="timing", leave=False):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(variants[name], device))
    return times


def _summarise(times: dict[str, list[float]], tokens: int) -> dict:
    ours, ref = times["ours"], times["mixtral"]
    return {
        "ours_tokens_per_s": tokens / statistics.median(ours),
        "mixtral_tokens_per_s": tokens / statistics.median(ref),
        "speed_ratio": statistics.median(r / o for o, r in zip(ours, ref)),  # > 1: ours is faster
        "rounds": len(ours),
    }


@torch.no_grad()
def throughput_report(
    model: PreTrainedModel,
    batch_size: int = 4,
    seq_len: int = 64,
    new_tokens: int = 16,
    rounds: int = 5,
) -> dict:
    """Measured forward and generation throughput of `model` and of the Mixtral reference, same run.

    Args:
        model: an MoE model of this repository (eval mode). batch_size, seq_len: forward batch shape (also the
        generation prompt shape). new_tokens: greedy tokens generated per sequence. rounds: timed rounds.
    Returns:
        {"reference": what the Mixtral is, "device", "dtype", "threads", "forward": {...}, "generate": {...}}
        where forward/generate hold tokens per second (prompt tokens for forward, new tokens for generate) of
        ours and Mixtral, and "speed_ratio" = median over rounds of Mixtral time / our time.
    Raises:
        EvalInputError: bad sizes, or seq_len + new_tokens longer than the model allows.
    """
    config = model.config
    for name, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("new_tokens", new_tokens),
        ("rounds", rounds),
    ):
        if value < 1:
            raise EvalInputError(f"cost_{name} must be >= 1, got {value}")
    if seq_len + new_tokens > config.max_position_embeddings:
        raise EvalInputError(
            f"cost_seq_len + cost_new_tokens = {seq_len + new_tokens} is longer than the model allows "
            f"(max_position_embeddings={config.max_position_embeddings})"
        )
    device = next(model.parameters()).device
    reference, note = reference_mixtral(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    mask = torch.ones_like(ids)
    gen_kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=config.pad_token_id or 0
    )
    forward = interleaved_timing(
        {"ours": lambda: model(input_ids=ids, attention_mask=mask), "mixtral": lambda: reference(input_ids=ids)},
        rounds,
        device,
    )
    generate = interleaved_timing(
        {
            "ours": lambda: model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs),
            "mixtral": lambda: reference.generate(input_ids=ids, attention_mask=mask, **gen_kwargs),
        },
        rounds,
        device,
    )
    return {
        "reference": note,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "new_tokens": new_tokens,
        "forward": _summarise(forward, batch_size * seq_len),
        "generate": _summarise(generate, batch_size * new_tokens),
    }


__all__ = [
    "BYTES_PER_PARAM",
    "as_local_moe",
    "interleaved_timing",
    "local_moe_config",
    "parameter_report",
    "reference_mixtral",
    "throughput_report",
    "unique_parameters",
]
