"""Router-stable LoRA fine-tuning of a saved mixture-of-experts model with peft and transformers' `Trainer`.

    python -m training.finetune_lora --model_name_or_path outputs/train/model --train_file data.txt \\
        --output_dir outputs/lora --max_steps 200 --merge
    python -m training.finetune_lora lora.yaml --max_steps 50          # arguments from a JSON / YAML file too

Defaults keep routing stable:
  * routers (`mlp.router`, `mlp.shared_expert_gate`) are never wrapped and never trained: explicit exclusion
    (peft's "all-linear" would wrap the shared-expert gate), an error when a target names one without
    `--lora_routers`, and a bitwise check after training;
  * LoRA on the attention projections, dense / shared-expert MLPs and, through peft `target_parameters`, the 3-D
    routed experts (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`);
  * the balancing loss stays on with its own coefficient (`--router_aux_loss_coef`, default: the model's).
Options:
  * `--router_lr_scale s`: train the routers (full weights, peft `modules_to_save`) at s x the learning rate;
  * `--routing_kl_coef c`: add c * KL(base router distribution || current) per layer, the base computed with the
    adapters disabled on the same batch (eval mode, no grad);
  * `--esft_top_p p`: ESFT (Wang et al. 2024): per MoE layer, only the experts that take the top share p of the
    routing mass on the fine-tuning data (base model) get LoRA updates; the others stay bitwise unchanged,
    including weight decay and optimizer state (`training.lora.ExpertSliceFreezer`). With ESFT the default module
    targets are none (the paper trains only the selected experts); add `--lora_target_modules` to combine.
  * `--update_router_bias`: keep updating aux-loss-free router biases (off: the base model's biases are kept); with
    `--router_lr_scale` the trained router copies carry the updated biases into the adapter and the merged model.
After training: a routing-drift report against the base model on the held-out split (per-layer top-k agreement
and mean KL, `drift.json`), the adapter (`<output_dir>/adapter`, peft format, written atomically) and with
`--merge` a merged Hub-ready model (`<output_dir>/merged`) whose logits are checked against the adapter model's.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, default_data_collator, set_seed

from modeling_moe import MoeConfig, MoeForCausalLM
from modeling_moe.balancing import RouterBiasUpdateCallback
from modeling_moe.checkpoint import check_checkpoint_folder, check_routing_fields, load_pretrained, read_config_dict
from modeling_moe.cli import CliParser, UsageError, check_output_dir, run_cli
from modeling_moe.hub import atomic_directory, atomic_write_text, check_disjoint, model_card, save_hub_ready
from training.checkpoints import remove_staging
from training.data import DataArguments, DataError, load_lm_datasets
from training.distributed import DistributedArguments, prepare_lora_model
from training.lora import (
    EXPERT_PARAMETERS,
    ExpertSliceFreezer,
    LoraTargetError,
    changed_router_tensors,
    default_module_targets,
    eval_mode,
    expert_routing_shares,
    lora_config,
    resolve_lora_targets,
    router_state,
    routing_drift,
    routing_kl_loss,
    select_experts,
    trainable_router_parameters,
)
from training.monitor import RouterMonitorCallback
from training.train import (
    MoeTrainer,
    MoeTrainingArguments,
    TrainArgumentError,
    check_moe_config_file,
    check_schedule_and_precision,
    parse_arguments,
    resolve_resume,
)

logger = logging.getLogger("training.finetune_lora")
PROG = "python -m training.finetune_lora"

# ------------------------------------------------------------------ readable defaults
DEFAULT_OUTPUT_DIR = "outputs/lora"
DEFAULT_LEARNING_RATE = 5e-4
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0
MERGE_TOLERANCE = 1e-4  # max |logit difference| between the merged and the adapter model, fp32
ESFT_MAX_BATCHES = 32


@dataclass
class LoraArguments:
    """The base model, the LoRA targets and the routing-stability options."""

    model_name_or_path: str = field(metadata={"help": "Saved base model folder (Hub-ready, safetensors)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Default: the model folder's."})
    lora_r: int = field(default=DEFAULT_RANK, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=DEFAULT_ALPHA, metadata={"help": "LoRA alpha (scaling alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (must be 0 with expert LoRA)."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module suffixes, 'all-linear' or 'none'. Default: attention and dense / "
            "shared-expert MLP projections (none with --esft_top_p). Routers are always excluded."
        },
    )
    lora_target_parameters: str | None = field(
        default=None,
        metadata={"help": f"Comma-separated parameter suffixes or 'none'. Default: {','.join(EXPERT_PARAMETERS)}."},
    )
    lora_routers: bool = field(default=False, metadata={"help": "Opt in: allow routers as LoRA targets."})
    router_lr_scale: float | None = field(
        default=None, metadata={"help": "Opt in: train the routers at this multiple of the learning rate."}
    )
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Balancing-loss coefficient while fine-tuning (default: the model's)."}
    )
    router_z_loss_coef: float | None = field(default=None, metadata={"help": "z-loss coefficient (default: model's)."})
    routing_kl_coef: float = field(default=0.0, metadata={"help": "Weight of KL(base routing || current routing)."})
    esft_top_p: float | None = field(default=None, metadata={"help": "ESFT: train the experts with this top share."})
    esft_max_batches: int = field(default=ESFT_MAX_BATCHES, metadata={"help": "Batches used to select experts."})
    update_router_bias: bool = field(default=False, metadata={"help": "Keep updating aux-loss-free router biases."})
    merge: bool = field(default=False, metadata={"help": "Also write the merged Hub-ready model."})
    drift_max_batches: int | None = field(default=None, metadata={"help": "Held-out batches for the drift report."})
    overwrite_outputs: bool = field(default=False, metadata={"help": "Replace existing adapter / merged folders."})


@dataclass
class LoraTrainingArguments(MoeTrainingArguments):
    """`MoeTrainingArguments` with LoRA defaults."""

    output_dir: str | None = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "Checkpoints, adapter, reports."})
    learning_rate: float = field(default=DEFAULT_LEARNING_RATE, metadata={"help": "Peak learning rate."})


class LoraMoeTrainer(MoeTrainer):
    """`MoeTrainer` plus the routing-consistency loss, a reduced router learning rate and ESFT slice freezing."""

    def __init__(
        self,
        *args,
        routing_kl_coef: float = 0.0,
        router_lr_scale: float | None = None,
        freezer: ExpertSliceFreezer | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.routing_kl_coef = routing_kl_coef
        self.router_lr_scale = router_lr_scale
        self.freezer = freezer
        self._kl_sum, self._kl_count = 0.0, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (model.training and self.routing_kl_coef > 0):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {**inputs, "output_router_logits": True}
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        peft_model = self.accelerator.unwrap_model(model)
        mask = inputs.get("attention_mask")
        with torch.no_grad(), peft_model.disable_adapter(), eval_mode(peft_model):
            reference = peft_model(input_ids=inputs["input_ids"], attention_mask=mask, output_router_logits=True)
        kl = routing_kl_loss(reference.router_logits, outputs.router_logits, mask)
        self._kl_sum += float(kl.detach())
        self._kl_count += 1
        loss = loss + self.routing_kl_coef * kl.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's logging, plus `routing_kl`: the mean routing-consistency KL since the previous log."""
        if self._kl_count and "loss" in logs:
            logs["routing_kl"] = self._kl_sum / self._kl_count
            self._kl_sum, self._kl_count = 0.0, 0
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.router_lr_scale is not None and not getattr(self, "_router_groups_done", False):
            router_ids = {id(p) for _, p in trainable_router_parameters(self.model)}
            extra = []
            for group in optimizer.param_groups:
                routers = [p for p in group["params"] if id(p) in router_ids]
                if routers:
                    group["params"] = [p for p in group["params"] if id(p) not in router_ids]
                    settings = {k: v for k, v in group.items() if k != "params"}
                    extra.append({**settings, "params": routers, "lr": group["lr"] * self.router_lr_scale})
            for group in extra:
                optimizer.add_param_group(group)
            self._router_groups_done = True
        if self.freezer is not None and not getattr(self, "_freezer_attached", False):
            self.freezer.attach(optimizer)
            self._freezer_attached = True
        return optimizer


# ------------------------------------------------------------------ arguments
def make_parser() -> CliParser:
    """The parser of `python -m training.finetune_lora`."""
    return CliParser((LoraArguments, DataArguments, LoraTrainingArguments, DistributedArguments), prog=PROG)


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    return [t.strip() for t in text.split(",") if t.strip()]


def validate_lora_arguments(lora_args: LoraArguments, args: LoraTrainingArguments) -> MoeConfig:
    """Checks that need only the config; returns the base model's config."""
    path = Path(lora_args.model_name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model_name_or_path: no such model folder {str(path)!r}")
    check_moe_config_file(path / "config.json", "model_name_or_path")
    tokenizer = lora_args.tokenizer_name_or_path
    if tokenizer and not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer_name_or_path: no such tokenizer folder {tokenizer!r}")
    for name in ("esft_max_batches", "drift_max_batches"):
        value = getattr(lora_args, name)
        if value is not None and value < 1:
            raise TrainArgumentError(f"--{name} must be >= 1, got {value}")
    check_routing_fields(read_config_dict(path), path / "config.json")  # before the config is built from it
    config = MoeConfig.from_pretrained(str(path))
    if lora_args.lora_r < 1:
        raise TrainArgumentError(f"--lora_r must be an integer >= 1, got {lora_args.lora_r}")
    if lora_args.lora_alpha <= 0:
        raise TrainArgumentError(f"--lora_alpha must be > 0, got {lora_args.lora_alpha}")
    if not 0 <= lora_args.lora_dropout < 1:
        raise TrainArgumentError(f"--lora_dropout must be in [0, 1), got {lora_args.lora_dropout}")
    if lora_args.router_lr_scale is not None and not lora_args.router_lr_scale > 0:
        raise TrainArgumentError(
            f"--router_lr_scale must be > 0 (omit it to freeze routers), got {lora_args.router_lr_scale}"
        )
    if lora_args.routing_kl_coef < 0:
        raise TrainArgumentError(f"--routing_kl_coef must be >= 0, got {lora_args.routing_kl_coef}")
    if lora_args.esft_top_p is not None and not 0 < lora_args.esft_top_p <= 1:
        raise TrainArgumentError(f"--esft_top_p must be in (0, 1], got {lora_args.esft_top_p}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(lora_args, name)
        if value is not None and value < 0:
            raise TrainArgumentError(f"--{name} must be >= 0, got {value}")
    if lora_args.update_router_bias and config.router_bias_update_rate <= 0:
        raise TrainArgumentError("--update_router_bias needs a model with router_bias_update_rate > 0")
    out = check_output_dir(args.output_dir, "--output_dir")
    for folder in ("adapter", "merged") if lora_args.merge else ("adapter",):
        target = out / folder
        check_disjoint(path, target, "--model_name_or_path", f"--output_dir's {folder}/")  # it is replaced whole
        if target.exists() and any(target.iterdir()) and not lora_args.overwrite_outputs:
            raise TrainArgumentError(
                f"{target} exists and is not empty; pass --overwrite_outputs or another --output_dir"
            )
    check_schedule_and_precision(args)
    args.resume_from_checkpoint = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    check_checkpoint_folder(path)  # before any data work: safetensors only, readable shards
    return config


def requested_targets(lora_args: LoraArguments, model: torch.nn.Module) -> tuple[list[str] | str, list[str]]:
    """The module and parameter targets asked for, defaults filled in."""
    modules = _split(lora_args.lora_target_modules)
    if modules is None:
        modules = [] if lora_args.esft_top_p is not None else default_module_targets(model)
    elif modules == ["all-linear"]:
        modules = "all-linear"
    parameters = _split(lora_args.lora_target_parameters)
    if parameters is None:
        parameters = list(EXPERT_PARAMETERS)
    if lora_args.esft_top_p is not None and not any(p in EXPERT_PARAMETERS for p in parameters):
        raise TrainArgumentError(
            f"--esft_top_p needs expert LoRA: --lora_target_parameters {','.join(EXPERT_PARAMETERS)}"
        )
    return modules, parameters


# ------------------------------------------------------------------ outputs
def merged_logits_check(peft_model: PeftModel, batch: dict) -> tuple[MoeForCausalLM, float]:
    """Merge the adapter into the base weights and return the merged model with the largest |logit difference|
    against the adapter model on `batch` (eval mode)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    with torch.no_grad(), eval_mode(peft_model):
        adapter_logits = peft_model(**kwargs).logits
    merged = peft_model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(**kwargs).logits
    return merged, float((merged_logits - adapter_logits).abs().max())


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A two-column plain-text table."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict:
    """Run `python -m training.finetune_lora` with `argv`; returns the results (drift, losses, paths)."""
    logging.basicConfig(format="%(name)s: %(message)s", level=logging.INFO)
    lora_args, data_args, args, dist_args = parse_arguments(make_parser(), argv)
    config = validate_lora_arguments(lora_args, args)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(lora_args.tokenizer_name_or_path or lora_args.model_name_or_path)
    with args.main_process_first(desc="tokenising and packing"):
        blocks = load_lm_datasets(data_args, tokenizer, config.max_position_embeddings)
    model = prepare_lora_model(load_pretrained(MoeForCausalLM, lora_args.model_name_or_path), dist_args, args)
    modules, parameters = requested_targets(lora_args, model)
    targets = resolve_lora_targets(model, modules, parameters, allow_routers=lora_args.lora_routers)
    peft_config = lora_config(
        model,
        targets,
        lora_args.lora_r,
        lora_args.lora_alpha,
        lora_args.lora_dropout,
        allow_routers=lora_args.lora_routers,
        train_routers=lora_args.router_lr_scale is not None,
    )

    base_coefs = (config.router_aux_loss_coef, config.router_z_loss_coef)
    if lora_args.router_aux_loss_coef is not None:
        model.config.router_aux_loss_coef = lora_args.router_aux_loss_coef
    if lora_args.router_z_loss_coef is not None:
        model.config.router_z_loss_coef = lora_args.router_z_loss_coef
    logger.info(
        "fine-tuning losses: aux coef %s, z coef %s, routing KL coef %s",
        model.config.router_aux_loss_coef,
        model.config.router_z_loss_coef,
        lora_args.routing_kl_coef,
    )
    if model.config.router_aux_loss_coef == 0 and config.router_bias_update_rate == 0:
        logger.warning("the balancing loss is OFF for this fine-tuning run (router_aux_loss_coef = 0)")

    selected = None
    if lora_args.esft_top_p is not None:
        loader = DataLoader(
            blocks["train"], batch_size=args.per_device_eval_batch_size, collate_fn=default_data_collator
        )
        batches = (b for i, b in enumerate(loader) if i < lora_args.esft_max_batches)
        shares = expert_routing_shares(model, batches)
        chosen = select_experts(shares, lora_args.esft_top_p)
        selected = dict(zip(config.moe_layers, chosen))
        logger.info("ESFT (top share %s): experts per layer %s", lora_args.esft_top_p, selected)

    routers_before = router_state(model)
    peft_model = get_peft_model(model, peft_config)
    frozen_routers = lora_args.router_lr_scale is None and not lora_args.lora_routers
    if frozen_routers and trainable_router_parameters(peft_model):
        raise RuntimeError(f"router parameters are trainable: {trainable_router_parameters(peft_model)}")
    freezer = ExpertSliceFreezer(peft_model, selected) if selected is not None else None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA: %d trainable parameters; modules %s; parameters %s", trainable, targets.modules, parameters)

    trainer = LoraMoeTrainer(
        model=peft_model,
        args=args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        routing_kl_coef=lora_args.routing_kl_coef,
        router_lr_scale=lora_args.router_lr_scale,
        freezer=freezer,
    )
    if lora_args.update_router_bias:
        trainer.add_callback(RouterBiasUpdateCallback())
    monitor = RouterMonitorCallback.attach(trainer)
    if trainer.is_world_process_zero():
        remove_staging(args.output_dir)  # staged checkpoints of killed runs
    train_output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    results: dict = {
        "global_step": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        "trainable_parameters": trainable,
        "log_history": trainer.state.log_history,
    }
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    router_ids = {id(p) for _, p in trainable_router_parameters(peft_model)}
    results["param_groups"] = [
        {
            "lr": group.get("initial_lr", group["lr"]),
            "weight_decay": group["weight_decay"],
            "params": len(group["params"]),
            "router": any(id(p) in router_ids for p in group["params"]),
        }
        for group in optimizer.param_groups
    ]
    if freezer is not None:
        violations = freezer.violations(optimizer)
        if violations:
            raise RuntimeError(f"ESFT frozen experts changed: {violations[:5]}")
        results["esft_experts"] = {str(k): v for k, v in selected.items()}
    changed = changed_router_tensors(routers_before, peft_model)
    results["routers_changed"] = changed
    if frozen_routers and changed:
        raise RuntimeError(f"router tensors changed although routers were frozen: {changed[:5]}")

    eval_loader = DataLoader(
        blocks["validation"], batch_size=args.per_device_eval_batch_size, collate_fn=default_data_collator
    )
    limit = lora_args.drift_max_batches
    drift = routing_drift(peft_model, (b for i, b in enumerate(eval_loader) if limit is None or i < limit))
    results["drift"] = drift
    results["base_perplexity"] = math.exp(min(drift["base_loss"], 50.0))
    results["tuned_perplexity"] = math.exp(min(drift["tuned_loss"], 50.0))
    results["router"] = monitor.history[-1]["layers"] if monitor.history else None

    out = Path(args.output_dir)
    if trainer.is_world_process_zero():
        with atomic_directory(out / "adapter", overwrite=lora_args.overwrite_outputs) as tmp:
            peft_model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "drift.json").write_text(json.dumps(drift, indent=1))
        results["adapter_dir"] = str(out / "adapter")
        atomic_write_text(out / "drift.json", json.dumps(drift, indent=1))
        if lora_args.merge:
            first = next(iter(eval_loader))
            merged, max_diff = merged_logits_check(peft_model, first)
            results["merge_max_abs_logit_diff"] = max_diff
            if max_diff > MERGE_TOLERANCE:
                raise RuntimeError(f"merged logits differ from the adapter model's by {max_diff} > {MERGE_TOLERANCE}")
            merged.config.router_aux_loss_coef, merged.config.router_z_loss_coef = base_coefs
            card = model_card(
                merged,
                out.name,
                base_model=lora_args.model_name_or_path,
                description=(
                    f"LoRA (r={lora_args.lora_r}) fine-tune of {lora_args.model_name_or_path}, merged, by "
                    "`python -m training.finetune_lora`. Routing drift on held-out data: top-k agreement "
                    f"{drift['mean_topk_agreement']:.3f}, mean KL {drift['mean_kl']:.4f}."
                ),
                extra_tags=("lora", "fine-tuned"),
            )
            save_hub_ready(
                merged, out / "merged", tokenizer=tokenizer, card=card, overwrite=lora_args.overwrite_outputs
            )
            results["merged_dir"] = str(out / "merged")
        summary = {k: v for k, v in results.items() if k != "router"}
        atomic_write_text(out / "finetune_results.json", json.dumps(summary, indent=1))
        rows = [
            ("steps", str(results["global_step"])),
            (
                "held-out perplexity base -> tuned",
                f"{results['base_perplexity']:.2f} -> {results['tuned_perplexity']:.2f}",
            ),
            ("top-k agreement (mean)", f"{drift['mean_topk_agreement']:.3f}"),
            ("router KL base||tuned (mean)", f"{drift['mean_kl']:.5f}"),
            *[
                (f"  layer {x['layer']}", f"agreement {x['topk_agreement']:.3f}, KL {x['kl']:.5f}")
                for x in drift["layers"]
            ],
            ("router tensors changed", str(len(changed))),
            ("adapter", results["adapter_dir"]),
        ]
        if "merged_dir" in results:
            rows.append(
                ("merged (max |logit diff|)", f"{results['merged_dir']} ({results['merge_max_abs_logit_diff']:.2e})")
            )
        print("LoRA fine-tuning summary\n" + summary_table(rows))
    trainer.accelerator.wait_for_everyone()
    return results


USER_ERRORS = (TrainArgumentError, DataError, LoraTargetError, UsageError)

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main, PROG, user_errors=USER_ERRORS)
