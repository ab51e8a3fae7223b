"""Scale-out options of the training CLIs: transformers' tensor / expert / fully-sharded parallelism, and
DeepSpeed ZeRO-3's MoE leaf modules. The CLIs add `DistributedArguments` to their parser and call `prepare_model`
(`prepare_lora_model` for LoRA) once; everything else (sharding, gradient reduction, saving full tensors) is
transformers'.

    torchrun --nproc_per_node 2 -m training.train ... --ep_size 2 --fsdp_size 2   # experts split, dense FSDP
    torchrun --nproc_per_node 2 -m training.train ... --tp_size 2                 # tensor parallel
    torchrun --nproc_per_node 2 -m training.train ... --tp_size 2 --ep_size 2     # TP attention, EP experts

The sizes multiply to the number of processes as transformers lays them out: tp_size * fsdp_size = world size,
and ep_size divides that (each expert lives on one of ep_size ranks, FSDP-sharded over the others).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from modeling_moe.cli import UsageError

logger = logging.getLogger("training.distributed")


class DistributedArgumentError(UsageError):
    """A scale-out argument is invalid; the message names it and what is allowed (a user error: one line)."""


@dataclass
class DistributedArguments:
    """transformers' `DistributedConfig` sizes (all 1: no sharding by transformers; DDP / DeepSpeed still work)."""

    tp_size: int = field(default=1, metadata={"help": "Tensor-parallel ranks (attention heads, FFN/expert width)."})
    ep_size: int = field(default=1, metadata={"help": "Expert-parallel ranks (num_local_experts / ep_size each)."})
    fsdp_size: int = field(default=1, metadata={"help": "FSDP2 ranks (parameters sharded, distinct batches)."})


def distributed_config(dist_args: DistributedArguments, training_args=None):
    """The `DistributedConfig` the arguments ask for, or None when every size is 1.

    Raises:
        DistributedArgumentError: a size is not an integer >= 1, the sizes do not match the launch's WORLD_SIZE,
            or they are combined with --deepspeed / --fsdp (Trainer's own engines).
    """
    sizes = {name: getattr(dist_args, name) for name in ("tp_size", "ep_size", "fsdp_size")}
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DistributedArgumentError(f"--{name} must be an integer >= 1, got {value!r}")
    if all(v == 1 for v in sizes.values()):
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, ep, fsdp = sizes["tp_size"], sizes["ep_size"], sizes["fsdp_size"]
    if tp * fsdp != world:
        raise DistributedArgumentError(
            f"--tp_size {tp} x --fsdp_size {fsdp} must equal the number of processes (WORLD_SIZE={world}); launch "
            "with torchrun --nproc_per_node N"
        )
    if ep > 1 and (ep % tp or (tp * fsdp) % ep):
        raise DistributedArgumentError(
            f"--ep_size {ep} must be a multiple of --tp_size {tp} and divide --tp_size x --fsdp_size ({tp * fsdp})"
        )
    if training_args is not None:
        if getattr(training_args, "deepspeed", None):
            raise DistributedArgumentError("--tp_size / --ep_size / --fsdp_size cannot be combined with --deepspeed")
        saves = str(getattr(training_args, "save_strategy", "no")) not in ("no", "SaveStrategy.NO")
        if saves and not training_args.save_only_model:
            raise DistributedArgumentError(
                "--tp_size / --ep_size / --fsdp_size: transformers cannot checkpoint the optimizer state of a model "
                "sharded at load time; pass --save_only_model true (checkpoints keep the weights) or "
                "--save_strategy no"
            )
        if getattr(training_args, "resume_from_checkpoint", None):
            raise DistributedArgumentError(
                "--resume_from_checkpoint cannot be combined with --tp_size / --ep_size / --fsdp_size: transformers "
                "does not resume models sharded at load time (continue from the weights with --model_name_or_path)"
            )
        if getattr(training_args, "fsdp", None):
            raise DistributedArgumentError(
                "--tp_size / --ep_size / --fsdp_size cannot be combined with Trainer's --fsdp (use --fsdp_size)"
            )
    from transformers.distributed import DistributedConfig

    return DistributedConfig(tp_size=tp, ep_size=ep, fsdp_size=fsdp)


def shard_model(model: PreTrainedModel, config, work_dir: str) -> PreTrainedModel:
    """`model` re-loaded with `from_pretrained(..., distributed_config=config)`, which shards at load time. The
    weights pass through a temporary folder under `work_dir` that rank 0 writes (every process can read it)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise DistributedArgumentError(
            "--tp_size / --ep_size / --fsdp_size need a distributed launch (torchrun --nproc_per_node N ...)"
        )
    os.makedirs(work_dir, exist_ok=True)
    folder = [tempfile.mkdtemp(prefix=".shard-init-", dir=work_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder)
    if dist.get_rank() == 0:
        model.save_pretrained(folder[0])
    dist.barrier()
    sharded = type(model).from_pretrained(folder[0], distributed_config=config)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(folder[0], ignore_errors=True)
    return sharded


def set_deepspeed_moe_leaves(model: torch.nn.Module, training_args) -> int:
    """Under DeepSpeed ZeRO-3, make each MoE block one leaf (`deepspeed.utils.set_z3_leaf_modules`): its experts'
    parameters are gathered together, so an expert that no token of this rank picked does not leave the other
    ranks waiting in the gather. Returns how many block classes were marked (0 without ZeRO-3)."""
    if not getattr(training_args, "deepspeed", None):
        return 0
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return 0
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(m) for m in model.modules() if type(m).__name__ == "MoeSparseBlock"}, key=str)
    set_z3_leaf_modules(model, classes)
    logger.info("DeepSpeed ZeRO-3: %s are leaf modules (experts gathered per block)", [c.__name__ for c in classes])
    return len(classes)


def prepare_model(model: PreTrainedModel, dist_args: DistributedArguments, training_args) -> PreTrainedModel:
    """The one call of the CLIs: shard `model` as the arguments ask (transformers' engines), or mark its MoE
    blocks as ZeRO-3 leaves under --deepspeed; otherwise return it unchanged (DDP is Trainer's default)."""
    config = distributed_config(dist_args, training_args)
    if config is not None:
        _ = training_args.device  # sets up the process group (gloo on a CPU-only machine)
        return shard_model(model, config, training_args.output_dir)
    set_deepspeed_moe_leaves(model, training_args)
    return model


def prepare_lora_model(model: PreTrainedModel, dist_args: DistributedArguments, training_args) -> PreTrainedModel:
    """The one call of `training.finetune_lora`: DDP (torchrun) and DeepSpeed ZeRO-3 (MoE blocks as leaves) work;
    transformers' load-time sharding is refused, because peft adds the adapters after loading: FSDP2 / TP / EP
    would leave them unsharded, and their gradients would not be reduced over the ranks (the ranks diverge)."""
    if distributed_config(dist_args, training_args) is not None:
        raise DistributedArgumentError(
            "--tp_size / --ep_size / --fsdp_size are not available for LoRA fine-tuning: transformers shards the model "
            "when it loads, before peft adds the adapters, so the adapters would be neither sharded nor reduced over "
            "the ranks. Launch with torchrun (DDP: the frozen base is replicated) or --deepspeed (ZeRO-3)"
        )
    set_deepspeed_moe_leaves(model, training_args)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded by transformers' engines (saving it is then a collective on every rank)."""
    return bool(getattr(model, "is_distributed_loading_by_transformers", False))


__all__ = [
    "DistributedArgumentError",
    "DistributedArguments",
    "distributed_config",
    "is_sharded",
    "prepare_lora_model",
    "prepare_model",
    "set_deepspeed_moe_leaves",
]
