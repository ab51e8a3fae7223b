"""Train or continue training a mixture-of-experts causal LM with transformers' `Trainer`.

    python -m training.train --preset tiny-mixtral --train_file corpus.txt --output_dir outputs/run --max_steps 200
    python -m training.train run.yaml                      # every argument from a JSON / YAML file ...
    python -m training.train run.yaml --max_steps 50       # ... and command-line values on top
    accelerate launch --multi_gpu --num_processes 2 -m training.train ...   # 2 processes, also on CPU (gloo)
    torchrun --nproc_per_node 2 -m training.train ... --ep_size 2 --fsdp_size 2 --save_only_model true
        # transformers' TP / EP / FSDP2 (--tp_size, --ep_size, --fsdp_size; training/distributed.py)

(On a CPU-only machine `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15 unless
an MPI hostfile is given; `--multi_gpu` launches through torchrun and works on CPU, as does `torchrun`.)

The model comes from exactly one of `--preset` (a name in configuration/ or a JSON file of MoeConfig fields),
`--config` (a saved config.json) or `--model_name_or_path` (a saved model folder: continue training).
`--resume_from_checkpoint DIR` resumes a Trainer checkpoint exactly (weights, optimizer, scheduler, RNG and data
position). Data: `--train_file` (txt / json / jsonl / parquet / csv) or `--dataset_name`, packed into
`--block_size`-token blocks (training/data.py). Without `--tokenizer_name_or_path`, a byte-level BPE with the
model's vocabulary size is trained on the training text and saved with the model.

MoE handling, on by default:
  * the loss is CE + router_aux_loss_coef * aux + router_z_loss_coef * z (the model adds them); training with no
    balancing at all (aux coefficient 0 and no aux-loss-free bias) is refused unless `--allow_no_balancing`
    (expert choice and Soft MoE need none: every expert gets its fixed share of slots);
  * aux-loss-free bias updates (`router_bias_update_rate > 0`) run after every optimizer step
    (`RouterBiasUpdateCallback`);
  * `RouterMonitorCallback` logs per-layer load, CV, entropy, drops, aux / z losses and dead experts at every
    logging step and writes a load heatmap to the output folder.

Loss scaling: the router losses are means over one micro-batch. transformers' token-count normalisation
(`num_items_in_batch`) would add them once per accumulation step and per process instead of averaging, so the model
turns it off (`MoeForCausalLM.accepts_loss_kwargs = False`, which any Trainer honours); every packed micro-batch
has the same number of label tokens, so the language-model loss is unchanged. The balancing loss is computed per
micro-batch on each process (as transformers and Megatron do), not over the global batch: two processes with micro-
batch b match one process with gradient accumulation 2 over the same micro-batches, not one process with micro-
batch 2b. Evaluation reports the LM loss alone (`eval_loss`, `perplexity = exp(eval_loss)`).

Outputs (`--output_dir`): Trainer checkpoints `checkpoint-N/` (safetensors), `router_load_heatmap.png`,
`router_monitor.json`, `train_results.json`, and the Hub-ready final model in `--final_model_dir` (default
`<output_dir>/model`: weights, config with auto_map, modeling files, tokenizer, model card), written atomically.
`--push_to_hub` (with `--hub_model_id`, `--hub_token`, `--hub_private_repo`, `--hub_revision`) uploads that
folder with the Hub calls `Trainer.push_to_hub` makes; Trainer's own pushes of intermediate checkpoints are off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.utils.hub import hf_api

from modeling_moe import MoeConfig, MoeForCausalLM, load_preset
from modeling_moe.balancing import RouterBiasUpdateCallback
from modeling_moe.checkpoint import check_routing_fields, load_pretrained
from modeling_moe.cli import CliParser, UsageError, check_output_dir, run_cli
from modeling_moe.hub import atomic_directory, atomic_write_text, model_card, save_hub_ready
from training.checkpoints import AtomicCheckpointMixin, incomplete_reason, last_complete_checkpoint, remove_staging
from training.data import (
    DataArguments,
    DataError,
    check_block_size,
    load_raw_datasets,
    text_iterator,
    tokenize_and_pack,
)
from training.distributed import DistributedArguments, is_sharded, prepare_model
from training.monitor import RouterMonitorCallback
from training.tokenizer import train_byte_level_bpe

logger = logging.getLogger("training.train")

# ------------------------------------------------------------------ readable defaults
DEFAULT_OUTPUT_DIR = "outputs/train"
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_BATCH_SIZE = 8
DEFAULT_LOGGING_STEPS = 10
DEFAULT_SAVE_STEPS = 200
TOKENIZER_TRAIN_CHARS = 2_000_000
FINAL_MODEL_SUBDIR = "model"


PROG = "python -m training.train"
RESUME_LATEST = "latest"


class TrainArgumentError(ValueError):
    """A training argument is invalid; the message names it and what is allowed."""


@dataclass
class ModelArguments:
    """Where the model and tokenizer come from, and what to do with the result."""

    preset: str | None = field(
        default=None, metadata={"help": "Train from scratch: a preset name (configuration/*.json) or a JSON path."}
    )
    config: str | None = field(default=None, metadata={"help": "Train from scratch from a saved config.json."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue training a saved model folder (safetensors)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "JSON object of MoeConfig fields set on top, e.g. '{\"capacity_factor_train\": null}'."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder; default: the model's, the checkpoint's, or a new BPE."}
    )
    final_model_dir: str | None = field(
        default=None, metadata={"help": f"Hub-ready final model folder (default <output_dir>/{FINAL_MODEL_SUBDIR})."}
    )
    overwrite_final_model: bool = field(default=False, metadata={"help": "Replace an existing final model folder."})
    model_card_name: str | None = field(default=None, metadata={"help": "Title of the model card."})
    allow_no_balancing: bool = field(
        default=False, metadata={"help": "Allow training with router_aux_loss_coef 0 and no aux-loss-free bias."}
    )
    router_monitor: bool = field(default=True, metadata={"help": "Log per-layer routing statistics."})


@dataclass
class MoeTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments` with defaults for small MoE runs.

    Multi-process runs on a machine without an accelerator set `use_cpu` (gloo), which transformers needs to
    treat the launch as distributed. `ddp_broadcast_buffers` is off: with gradient accumulation, DDP re-broadcasts
    rank 0's buffers at the forward of the synchronising micro-batch, which would overwrite every other rank's
    router `load_counts` of the earlier micro-batches with rank 0's, and the aux-loss-free bias update (which sums
    the counts over ranks) would count rank 0's tokens twice and lose the others'. The bias itself stays
    identical on all ranks without the broadcast, because each applies the same update from the summed counts.
    """

    output_dir: str | None = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "Checkpoints and logs."})
    learning_rate: float = field(default=DEFAULT_LEARNING_RATE, metadata={"help": "Peak AdamW learning rate."})
    per_device_train_batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "Micro-batch size."})
    per_device_eval_batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "Eval batch size."})
    logging_steps: float = field(default=DEFAULT_LOGGING_STEPS, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=DEFAULT_SAVE_STEPS, metadata={"help": "Checkpoint every N steps."})
    prediction_loss_only: bool = field(default=True, metadata={"help": "Evaluation keeps only the loss."})
    ddp_broadcast_buffers: bool | None = field(default=False, metadata={"help": "See the class docstring."})

    def __post_init__(self) -> None:
        # transformers runs a multi-process launch on a machine without accelerator as separate single-process
        # trainings unless `use_cpu` is set; set it, so that `accelerate launch --multi_gpu` / torchrun just work.
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            self.use_cpu = True
        super().__post_init__()


class MoeTrainer(AtomicCheckpointMixin, Trainer):
    """`Trainer` whose loss keeps the router losses correctly scaled, and whose eval loss is the LM loss alone.

    Checkpoints are written whole or not at all (`training.checkpoints.AtomicCheckpointMixin`).

    * training: the model's loss (CE + weighted router losses, per micro-batch); the model declares
      `accepts_loss_kwargs = False`, so gradient accumulation and data parallelism average the router losses
      instead of summing them;
    * evaluation: `eval_loss` is the token-mean cross-entropy, so `exp(eval_loss)` is the perplexity.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        lm = causal_lm(model)
        loss = lm.loss_function(logits=outputs.logits, labels=inputs["labels"], vocab_size=lm.config.vocab_size)
        return (loss, outputs) if return_outputs else loss


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The MoE causal LM inside `model` (itself, or inside peft / DDP wrappers): the module with `router_losses`."""
    for module in model.modules():
        if callable(getattr(module, "router_losses", None)):
            return module
    raise TrainArgumentError(f"{type(model).__name__} contains no MoE causal LM (a module with router_losses)")


# ------------------------------------------------------------------ argument parsing
def make_parser() -> CliParser:
    """The parser of `python -m training.train`: model, data and training argument dataclasses."""
    return CliParser((ModelArguments, DataArguments, MoeTrainingArguments, DistributedArguments), prog=PROG)


def parse_arguments(parser: CliParser, argv: list[str] | None) -> tuple:
    """Parse `argv`; a first argument ending in .json / .yaml / .yml is a file of arguments that the remaining
    command-line arguments override.

    Raises:
        TrainArgumentError: the file is missing, unreadable, not a mapping, or names unknown arguments.
        UsageError: an unknown flag (with the closest known one) or a value argparse / TrainingArguments refuses.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise FileNotFoundError(f"arguments file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
            kind = "JSON" if path.suffix == ".json" else "YAML"
            raise TrainArgumentError(f"arguments file {path} is not valid {kind}: {err}") from err
        if not isinstance(values, dict):
            raise TrainArgumentError(f"{path} must hold a mapping of argument names to values")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainArgumentError(f"{path} has unknown arguments {unknown}; see --help")
        argv = [*file_values_as_argv(values), *argv]  # later (command-line) values win
    return parser.parse(argv)


def file_values_as_argv(values: dict) -> list[str]:
    """Arguments-file values as command-line tokens, so that they are converted and checked like typed ones:
    lists become several values, mappings (e.g. config_overrides) JSON, booleans true / false; None is skipped."""
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *(str(v) for v in value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def validate_arguments(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments) -> None:
    """Checks that need no model or data (run first, before anything is loaded)."""
    sources = [n for n in ("preset", "config", "model_name_or_path") if getattr(model_args, n)]
    if len(sources) != 1:
        raise TrainArgumentError(
            f"give exactly one of --preset, --config, --model_name_or_path (got {sources or 'none'})"
        )
    for name in ("config", "model_name_or_path", "tokenizer_name_or_path"):
        value = getattr(model_args, name)
        if value and not Path(value).exists():
            raise FileNotFoundError(f"--{name}: no such file or folder {value!r}")
    saved = model_args.config or model_args.model_name_or_path
    if saved:
        check_moe_config_file(Path(saved) / "config.json" if Path(saved).is_dir() else Path(saved), sources[0])
    check_output_dir(args.output_dir, "--output_dir")
    final_dir = check_output_dir(final_model_dir(model_args, args), "--final_model_dir")
    if final_dir.exists() and any(final_dir.iterdir()) and not model_args.overwrite_final_model:
        raise TrainArgumentError(
            f"--final_model_dir {final_dir} exists and is not empty; pass --overwrite_final_model or pick another"
        )
    check_schedule_and_precision(args)
    args.resume_from_checkpoint = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    check_final_dir_is_apart(final_dir, model_args, data_args, args)
    if args.push_to_hub and args.hub_model_id is not None and args.hub_model_id.count("/") > 1:
        raise TrainArgumentError(f"--hub_model_id must be 'name' or 'owner/name', got {args.hub_model_id!r}")


def check_final_dir_is_apart(
    final_dir: Path, model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments
) -> None:
    """The final model replaces --final_model_dir as a whole (with --overwrite_final_model): refuse one that
    contains an input (model, tokenizer, checkpoint, data files) or is or contains --output_dir (its checkpoints),
    which the replacement would delete. Replacing the --model_name_or_path folder itself is allowed: the model is
    loaded before and the swap is atomic."""
    inputs = [
        ("--model_name_or_path", model_args.model_name_or_path),
        ("--tokenizer_name_or_path", model_args.tokenizer_name_or_path),
        ("--resume_from_checkpoint", args.resume_from_checkpoint),
        *[("--train_file", f) for f in data_args.train_file or []],
        *[("--validation_file", f) for f in data_args.validation_file or []],
        ("--output_dir", args.output_dir),
    ]
    final = final_dir.resolve()
    for name, path in inputs:
        if not path:
            continue
        resolved = Path(path).resolve()
        if final in resolved.parents or (name == "--output_dir" and final == resolved):
            relation = "is" if final == resolved else "contains"
            raise TrainArgumentError(
                f"--final_model_dir {str(final_dir)!r} {relation} {name} {str(path)!r}; writing the final model "
                f"there would delete it (default: <output_dir>/{FINAL_MODEL_SUBDIR})"
            )


def check_schedule_and_precision(args: TrainingArguments) -> None:
    """--max_steps is -1 (train --num_train_epochs epochs) or >= 1; --fp16 needs an accelerator."""
    if args.max_steps == 0 or args.max_steps < -1:
        raise TrainArgumentError(
            f"--max_steps must be >= 1, or -1 (the default) to train --num_train_epochs epochs; got {args.max_steps}"
        )
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise TrainArgumentError(f"--num_train_epochs must be > 0 (or give --max_steps), got {args.num_train_epochs}")
    on_cpu = args.use_cpu or not torch.accelerator.is_available()
    for flag in ("fp16", "fp16_full_eval"):
        if getattr(args, flag) and on_cpu:
            raise TrainArgumentError(
                f"--{flag} needs a GPU or other accelerator, and this run is on the CPU; use --bf16 or float32 on CPU"
            )


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint: None, `latest` (the last complete checkpoint-N/ of --output_dir) or a folder,
    which must be a complete checkpoint (trainer_state.json and safetensors weights)."""
    if not value:
        return None
    if value == RESUME_LATEST:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise TrainArgumentError(
                f"--resume_from_checkpoint {RESUME_LATEST}: --output_dir {output_dir!r} holds no complete checkpoint-N/"
            )
        logger.info("resuming from %s", found)
        return str(found)
    if not Path(value).is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint: no such folder {value!r} (give a checkpoint folder or {RESUME_LATEST!r})"
        )
    reason = incomplete_reason(value)
    if reason is not None:
        raise TrainArgumentError(f"--resume_from_checkpoint {value}: not a complete Trainer checkpoint, {reason}")
    return value


def check_moe_config_file(path: Path, argument: str) -> None:
    """Raise unless `path` is a config.json of a modeling_moe model (model_type "moe_lm")."""
    if not path.is_file():
        raise FileNotFoundError(f"--{argument}: no config.json at {str(path)!r}")
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise TrainArgumentError(f"--{argument}: {path} is not a JSON object: {err}") from err
    if model_type != MoeConfig.model_type:
        raise TrainArgumentError(
            f"--{argument}: {path} describes a {model_type!r} model, not a modeling_moe one "
            f"({MoeConfig.model_type!r}); "
            "upcycle a dense checkpoint first (python -m training.upcycle)"
        )


def final_model_dir(model_args: ModelArguments, args: TrainingArguments) -> Path:
    """Where the Hub-ready final model goes."""
    return Path(model_args.final_model_dir or Path(args.output_dir) / FINAL_MODEL_SUBDIR)


def parse_config_overrides(text: str | None) -> dict:
    """`--config_overrides` as a dict (a JSON object)."""
    if not text:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise TrainArgumentError(f"--config_overrides must be a JSON object, got {text!r}: {err}") from err
    if not isinstance(values, dict):
        raise TrainArgumentError(f"--config_overrides must be a JSON object, got {text!r}")
    return values


# ------------------------------------------------------------------ model and tokenizer
def load_config(model_args: ModelArguments) -> MoeConfig:
    """The model config from --preset / --config / --model_name_or_path, with --config_overrides applied."""
    overrides = parse_config_overrides(model_args.config_overrides)
    if model_args.preset:
        return load_preset(model_args.preset, **overrides)
    path = Path(model_args.config or model_args.model_name_or_path)
    if not model_args.config and (path / "config.json").is_file():  # a saved model: its routing must be explicit
        check_routing_fields(json.loads((path / "config.json").read_text()), path / "config.json")
    config = MoeConfig.from_pretrained(str(path))
    if not isinstance(config, MoeConfig):
        raise TrainArgumentError(f"{path} is not a modeling_moe config (model_type {config.model_type!r})")
    if overrides:  # built again, so that overrides are validated and misspelt keys refused like any field
        config = MoeConfig.from_dict({**config.to_dict(), **overrides})
    return config


def load_or_train_tokenizer(
    model_args: ModelArguments, args: TrainingArguments, raw_train, text_column: str, vocab_size: int
) -> PreTrainedTokenizerBase:
    """The tokenizer: --tokenizer_name_or_path, else the model folder's, else the resumed checkpoint's, else a
    byte-level BPE trained on the training text (saved to <output_dir>/tokenizer and reused by later runs)."""
    candidates = [model_args.tokenizer_name_or_path, model_args.model_name_or_path, args.resume_from_checkpoint]
    for folder in candidates:
        if folder and (Path(folder) / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    if model_args.tokenizer_name_or_path:
        raise FileNotFoundError(f"--tokenizer_name_or_path {model_args.tokenizer_name_or_path!r} has no tokenizer")
    saved = Path(args.output_dir) / "tokenizer"
    with args.main_process_first(desc="tokenizer training"):
        if (saved / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(saved)
        logger.info("training a byte-level BPE tokenizer (vocab %d) on the training text", vocab_size)
        tokenizer = train_byte_level_bpe(text_iterator(raw_train, text_column, TOKENIZER_TRAIN_CHARS), vocab_size)
        if args.process_index == 0:
            with atomic_directory(saved, overwrite=True) as tmp:  # a killed run leaves no half-written tokenizer
                tokenizer.save_pretrained(tmp)
        return tokenizer


def build_model(model_args: ModelArguments, config: MoeConfig, tokenizer) -> MoeForCausalLM:
    """A new model from `config` (special-token ids taken from the tokenizer), or the saved model to continue."""
    if len(tokenizer) > config.vocab_size:
        raise TrainArgumentError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; pass "
            f"--config_overrides '{{\"vocab_size\": {len(tokenizer)}}}' (new models) or a matching tokenizer"
        )
    if model_args.model_name_or_path:
        return load_pretrained(MoeForCausalLM, model_args.model_name_or_path, config=config)  # overrides applied
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name)
        if value is not None:
            setattr(config, name, value)
    return MoeForCausalLM(config)


def check_balancing(config: MoeConfig, allow_no_balancing: bool) -> str:
    """One line describing the MoE losses in force; raises when no balancing is on and that was not allowed."""
    line = (
        f"MoE losses: aux coef {config.router_aux_loss_coef}, z coef {config.router_z_loss_coef}, "
        f"importance coef {config.router_importance_loss_coef}, aux-loss-free bias rate "
        f"{config.router_bias_update_rate}, router {config.router_type}"
    )
    balanced = (
        config.router_aux_loss_coef > 0
        or config.router_importance_loss_coef > 0
        or config.router_bias_update_rate > 0
        or config.router_type in ("expert_choice", "soft")  # balanced by construction / nothing to balance
    )
    if not balanced and not allow_no_balancing:
        raise TrainArgumentError(
            "no load balancing is on (router_aux_loss_coef = router_importance_loss_coef = router_bias_update_rate "
            "= 0): experts will collapse. Set one in --config_overrides, or pass --allow_no_balancing"
        )
    return line


def moe_callbacks(trainer: Trainer, config: MoeConfig, monitor: bool) -> RouterMonitorCallback | None:
    """Attach the router monitor (first, so reporters see it) and, with aux-loss-free balancing, the bias
    update callback. Returns the monitor."""
    if config.router_bias_update_rate > 0:
        trainer.add_callback(RouterBiasUpdateCallback())
    return RouterMonitorCallback.attach(trainer) if monitor else None


# ------------------------------------------------------------------ outputs
def training_card(model, name: str, base: str | None, data_args: DataArguments, results: dict) -> str:
    """The model card: `modeling_moe.hub.model_card` with how the model was trained."""
    source = data_args.dataset_name or ", ".join(Path(f).name for f in data_args.train_file or [])
    config = model.config
    lines = [
        f"Trained with `python -m training.train` on {source} (blocks of {data_args.block_size} tokens).",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {results.get('global_step')} |",
        f"| final train loss (CE + router losses) | {results.get('train_loss', float('nan')):.4f} |",
        f"| eval loss (CE) | {results.get('eval_loss', float('nan')):.4f} |",
        f"| eval perplexity | {results.get('perplexity', float('nan')):.2f} |",
        f"| router aux / z loss coef | {config.router_aux_loss_coef} / {config.router_z_loss_coef} |",
        "",
        "The balancing loss was computed per micro-batch and process (transformers / Megatron convention).",
    ]
    return model_card(model, name, base_model=base, description="\n".join(lines), extra_tags=("trained",))


def push_folder_to_hub(folder: Path, args: TrainingArguments) -> str:
    """Upload the Hub-ready `folder` with the two calls `Trainer.push_to_hub` makes (create_repo, upload_folder),
    using the TrainingArguments hub settings. Returns the repo id."""
    api = hf_api()
    repo_id = api.create_repo(
        args.hub_model_id or folder.parent.name, token=args.hub_token, private=args.hub_private_repo, exist_ok=True
    ).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message="End of training",
        token=args.hub_token,
        revision=args.hub_revision,
    )
    return repo_id


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    """Run `python -m training.train` with `argv`; returns the results (losses, perplexity, paths, log history)."""
    logging.basicConfig(format="%(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, args, dist_args = parse_arguments(make_parser(), argv)
    validate_arguments(model_args, data_args, args)
    push, args.push_to_hub = args.push_to_hub, False  # we push the Hub-ready folder ourselves, at the end
    config = load_config(model_args)
    check_block_size(data_args.block_size, config.max_position_embeddings)
    balancing = check_balancing(config, model_args.allow_no_balancing)
    raw = load_raw_datasets(data_args)
    set_seed(args.seed)
    tokenizer = load_or_train_tokenizer(model_args, args, raw["train"], data_args.text_column, config.vocab_size)
    with args.main_process_first(desc="tokenising and packing"):
        blocks = tokenize_and_pack(
            raw,
            tokenizer,
            data_args.block_size,
            data_args.text_column,
            data_args.preprocessing_num_workers,
            data_args.max_train_samples,
            data_args.max_eval_samples,
        )
    model = prepare_model(build_model(model_args, config, tokenizer), dist_args, args)  # --tp/ep/fsdp_size
    logger.info("%s", balancing)
    logger.info(
        "train blocks %d, eval blocks %d, processes %d",
        len(blocks["train"]),
        len(blocks["validation"]),
        args.world_size,
    )

    trainer = MoeTrainer(
        model=model,
        args=args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    monitor = moe_callbacks(trainer, model.config, model_args.router_monitor)
    if trainer.is_world_process_zero():
        remove_staging(args.output_dir)  # staged checkpoints of killed runs
    train_output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    eval_metrics = trainer.evaluate()
    results = {
        "global_step": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "perplexity": math.exp(min(eval_metrics["eval_loss"], 50.0)),
        "log_history": trainer.state.log_history,
        "final_model_dir": None,
    }
    final_dir = final_model_dir(model_args, args)
    if is_sharded(model) or trainer.is_world_process_zero():  # a sharded model is saved by every rank together
        name = model_args.model_card_name or final_dir.parent.name
        card = training_card(model, name, model_args.model_name_or_path, data_args, results)
        save_hub_ready(model, final_dir, tokenizer=tokenizer, card=card, overwrite=model_args.overwrite_final_model)
    if trainer.is_world_process_zero():
        results["final_model_dir"] = str(final_dir)
        summary = {k: v for k, v in results.items() if k != "log_history"}
        atomic_write_text(Path(args.output_dir) / "train_results.json", json.dumps(summary, indent=1))
        if monitor is not None and monitor.history:
            results["router"] = monitor.history[-1]["layers"]
        if push:
            results["hub_repo_id"] = push_folder_to_hub(final_dir, args)
        logger.info(
            "done: step %d, train loss %.4f, eval loss %.4f, perplexity %.2f -> %s",
            results["global_step"],
            results["train_loss"],
            results["eval_loss"],
            results["perplexity"],
            final_dir,
        )
    trainer.accelerator.wait_for_everyone()
    return results


USER_ERRORS = (TrainArgumentError, DataError, UsageError)

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main, PROG, user_errors=USER_ERRORS)
