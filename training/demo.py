"""End-to-end demo (the README's main job): tokenizer -> dense Llama -> upcycled MoE -> MoE training -> router-stable
LoRA -> evaluation -> Hub-ready model -> fresh-process reload with trust_remote_code, offline, on a CPU.

    python -m training.demo                                   # a few minutes on a 2-core CPU
    python -m training.demo --dataset my.jsonl --preset mixtral-small --dense_steps 2000 ...   # your data, bigger
    python -m training.demo --smoke                           # the smallest setting (the test)

Steps (each shows progress):
  1. text: Python's standard-library docstrings (or `--dataset`: a local file or a `datasets` name), split in
     order into a pre-training part and a later, held-out part (the fine-tuning domain), of which a third is
     kept for evaluation;
  2. a byte-level BPE tokenizer (the tokenizers library) trained on the pre-training part;
  3. a dense transformers `LlamaForCausalLM` with the preset's shape, trained with `Trainer`;
  4. sparse upcycling (`modeling_moe.upcycling.upcycle`, copied experts, normal router): the MoE starts with the
     dense model's function (checked: same logits);
  5. MoE training with `python -m training.train` (MoE losses, router monitor, load heatmap);
  6. router-stable LoRA on the fine-tuning slice with `python -m training.finetune_lora` (routers frozen and
     checked bitwise, drift report, merge);
  7. evaluation of every stage on the evaluation slice: perplexity (`eval.perplexity`) and routing
     (`eval.routing`, statistics from `modeling_moe.routing_stats`);
  8. the final Hub-ready folder, reloaded in a fresh interpreter that cannot import this repository
     (`trust_remote_code`), whose logits and greedy generation must equal the in-process model's;
  9. a summary table (also `summary.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator, set_seed

from eval.perplexity import evaluate_perplexity, tokenize_documents
from eval.routing import collect_routing
from modeling_moe import MoeForCausalLM, count_parameters, load_preset
from modeling_moe.cli import CliArgumentParser, UsageError, check_output_dir, run_cli
from modeling_moe.corpus import stdlib_paragraphs
from modeling_moe.hub import model_card, save_hub_ready
from modeling_moe.upcycling import upcycle
from training import finetune_lora, train
from training.data import DataArguments, DataError, load_raw_datasets, tokenize_and_pack
from training.tokenizer import train_byte_level_bpe

PROMPT = "Return a new list containing"
# Readable defaults: the full demo (a few minutes on 2 CPU cores) and the smoke setting (the test).
DEFAULTS = {
    "corpus_chars": 400_000,
    "block_size": 128,
    "batch_size": 8,
    "dense_steps": 300,
    "moe_steps": 200,
    "lora_steps": 100,
    "dense_lr": 3e-3,
    "moe_lr": 1e-3,
    "lora_lr": 2e-3,
    "num_experts": 4,
    "experts_per_token": 2,
}
SMOKE = {
    "corpus_chars": 40_000,
    "block_size": 32,
    "batch_size": 4,
    "dense_steps": 4,
    "moe_steps": 4,
    "lora_steps": 4,
    "config_overrides": {
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 64,
        "moe_intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    },
}
PRETRAIN_SHARE = 0.8  # the first 80% of the documents; the rest is the fine-tuning domain (1/3 held out for eval)
STAGE_DIRS = ("data", "tokenizer", "dense", "dense_train", "upcycled", "moe_train", "moe", "lora", "model")
EVAL_MAX_TOKENS = 20_000


@dataclass
class Stage:
    """One row of the summary table."""

    name: str
    what: str
    steps: int | str = "-"
    seconds: float = 0.0
    perplexity: float | None = None
    params: str = ""
    routing: str = ""


def step(i: int, total: int, text: str) -> None:
    """Print a numbered step header."""
    print(f"\n[{i}/{total}] {text}", flush=True)


# ------------------------------------------------------------------ data
def load_documents(dataset: str | None, text_column: str, max_chars: int, cache_dir: Path) -> list[str]:
    """The demo's documents: stdlib docstrings, or the train + validation text of `dataset` (a local file or a
    `datasets` name, read through training/data.py), cut at `max_chars` characters."""
    if dataset is None:
        return stdlib_paragraphs(max_chars=max_chars)
    is_file = Path(dataset).is_file()
    args = DataArguments(
        train_file=[dataset] if is_file else None,
        dataset_name=None if is_file else dataset,
        text_column=text_column,
        cache_dir=str(cache_dir),
    )
    raw = load_raw_datasets(args)
    docs, total = [], 0
    for split in ("train", "validation"):
        for text in raw[split][text_column]:
            docs.append(" ".join(text.split()))
            total += len(docs[-1])
            if total >= max_chars:
                return docs
    return docs


def split_documents(docs: list[str], folder: Path) -> dict[str, Path]:
    """Write the slices as one-document-per-line text files and return their paths: the first PRETRAIN_SHARE
    of the documents (in order) for pre-training; the rest, a later part of the text, is the fine-tuning domain,
    of which every third document is held out for evaluation and the others are fine-tuned on."""
    if len(docs) < 40:
        raise ValueError(f"the demo needs at least 40 documents, got {len(docs)}; give more text (--corpus_chars)")
    cut = int(len(docs) * PRETRAIN_SHARE)
    domain = docs[cut:]
    parts = {
        "pretrain": docs[:cut],
        "finetune": [d for i, d in enumerate(domain) if i % 3 != 2],
        "eval": domain[2::3],
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in parts.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("\n".join(" ".join(d.split()) for d in part) + "\n", encoding="utf-8")
    return paths


# ------------------------------------------------------------------ stages
def dense_config(moe_shape, tokenizer) -> LlamaConfig:
    """A Llama config with the MoE preset's shape (its FFN width = one expert's), special ids from the tokenizer."""
    return LlamaConfig(
        vocab_size=moe_shape.vocab_size,
        hidden_size=moe_shape.hidden_size,
        intermediate_size=moe_shape.moe_intermediate_size,
        num_hidden_layers=moe_shape.num_hidden_layers,
        num_attention_heads=moe_shape.num_attention_heads,
        num_key_value_heads=moe_shape.num_key_value_heads,
        max_position_embeddings=moe_shape.max_position_embeddings,
        rms_norm_eps=moe_shape.rms_norm_eps,
        tie_word_embeddings=moe_shape.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def train_dense(config: LlamaConfig, tokenizer, paths: dict[str, Path], out: Path, opts: dict, seed: int):
    """Train the dense `LlamaForCausalLM` with transformers' Trainer on the pre-training slice; save it."""
    data_args = DataArguments(train_file=[str(paths["pretrain"])], block_size=opts["block_size"])
    data_args.cache_dir = str(out.parent / "cache")
    raw = load_raw_datasets(data_args)
    blocks = tokenize_and_pack(raw, tokenizer, opts["block_size"])
    set_seed(seed)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(
        output_dir=str(out.parent / "dense_train"),
        max_steps=opts["dense_steps"],
        per_device_train_batch_size=opts["batch_size"],
        learning_rate=opts["dense_lr"],
        lr_scheduler_type="cosine",
        warmup_steps=min(20, opts["dense_steps"] // 10),
        logging_steps=max(1, opts["dense_steps"] // 4),
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=blocks["train"], data_collator=default_data_collator)
    result = trainer.train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model.eval(), result.training_loss


def upcycle_dense(dense: LlamaForCausalLM, tokenizer, out: Path, preset, opts: dict, seed: int):
    """Sparse upcycling with copied experts and a normal router; the balancing losses of the preset."""
    return upcycle(
        dense,
        num_experts=opts["num_experts"],
        num_experts_per_tok=opts["experts_per_token"],
        expert_init="copy",
        router_init="normal",
        tokenizer=tokenizer,
        out_dir=out,
        overwrite=True,
        seed=seed,
        base_model="dense LlamaForCausalLM trained by training/demo.py",
        config_overrides={
            "router_aux_loss_coef": preset.router_aux_loss_coef,
            "router_z_loss_coef": preset.router_z_loss_coef,
        },
        progress=True,
    )


def run_train(paths: dict[str, Path], out: Path, opts: dict, seed: int) -> dict:
    """Continue training the upcycled MoE with `python -m training.train` (in-process)."""
    steps = opts["moe_steps"]
    return train.main(
        [
            "--model_name_or_path", str(out / "upcycled"),
            "--train_file", str(paths["pretrain"]),
            "--output_dir", str(out / "moe_train"),
            "--final_model_dir", str(out / "moe"),
            "--overwrite_final_model", "true",
            "--cache_dir", str(out / "cache"),
            "--block_size", str(opts["block_size"]),
            "--per_device_train_batch_size", str(opts["batch_size"]),
            "--learning_rate", str(opts["moe_lr"]),
            "--lr_scheduler_type", "cosine",
            "--max_steps", str(steps),
            "--logging_steps", str(max(1, steps // 4)),
            "--save_steps", str(steps),
            "--save_total_limit", "1",
            "--seed", str(seed),
            "--model_card_name", "moe-demo (upcycled, trained)",
        ]
    )  # fmt: skip


def run_lora(paths: dict[str, Path], out: Path, opts: dict, seed: int) -> dict:
    """Router-stable LoRA on the fine-tuning slice with `python -m training.finetune_lora` (in-process)."""
    steps = opts["lora_steps"]
    return finetune_lora.main(
        [
            "--model_name_or_path", str(out / "moe"),
            "--train_file", str(paths["finetune"]),
            "--output_dir", str(out / "lora"),
            "--cache_dir", str(out / "cache"),
            "--block_size", str(opts["block_size"]),
            "--per_device_train_batch_size", str(opts["batch_size"]),
            "--learning_rate", str(opts["lora_lr"]),
            "--max_steps", str(steps),
            "--logging_steps", str(max(1, steps // 2)),
            "--save_strategy", "no",
            "--validation_split_percentage", "10",
            "--seed", str(seed),
            "--merge", "true",
            "--overwrite_outputs", "true",
        ]
    )  # fmt: skip


# ------------------------------------------------------------------ evaluation
def evaluate_model(model, tokenizer, texts: list[str], block_size: int, desc: str) -> tuple[float, dict | None]:
    """Perplexity on the evaluation texts (eval.perplexity) and, for MoE models, the routing summary per layer
    (eval.routing, over at most EVAL_MAX_TOKENS tokens)."""
    model.eval()
    docs = tokenize_documents(texts, tokenizer)
    with torch.no_grad():
        ppl = evaluate_perplexity(
            model, docs, texts, max_length=block_size, batch_size=8, pad_id=tokenizer.pad_token_id, desc=desc
        ).perplexity
    if getattr(model.config, "model_type", None) != "moe_lm":
        return ppl, None
    capture = collect_routing(
        model, docs, max_length=block_size, max_tokens=EVAL_MAX_TOKENS, pad_id=tokenizer.pad_token_id, desc=desc
    )
    return ppl, {"layers": capture.summary}


def routing_text(routing: dict | None) -> str:
    """'CV 0.12/0.08, dead 0, drops 0.0%' over the MoE layers."""
    if not routing:
        return ""
    layers = routing["layers"]
    cv = "/".join(f"{layer['load_cv']:.2f}" for layer in layers)
    dead = sum(len(layer["dead_experts"]) for layer in layers)
    drops = max(layer["dropped_fraction"] for layer in layers)
    return f"load CV {cv}, dead {dead}, drops {drops:.1%}"


def params_text(model) -> str:
    """'1.23M' or '1.23M total / 0.70M active'."""
    counts = count_parameters(model) if isinstance(model, MoeForCausalLM) else None
    if counts is None:
        return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
    return f"{counts.total_params / 1e6:.2f}M total / {counts.active_params / 1e6:.2f}M active"


def fresh_process_generate(model_dir: Path, prompt: str, max_new_tokens: int = 24) -> dict:
    """Run `training/fresh_load.py` in an isolated interpreter (no PYTHONPATH, `-I`) and return its JSON result."""
    script = Path(__file__).with_name("fresh_load.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(model_dir), prompt, str(max_new_tokens)],
        cwd=model_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"fresh-process load failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(stages: list[Stage]) -> str:
    """The summary as a Markdown table."""
    header = ["stage", "what", "steps", "time", "eval ppl", "parameters", "routing / checks"]
    rows = [
        [
            s.name,
            s.what,
            str(s.steps),
            f"{s.seconds:.1f}s",
            f"{s.perplexity:.2f}" if s.perplexity is not None else "",
            s.params,
            s.routing,
        ]
        for s in stages
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# ------------------------------------------------------------------ main
PROG = "python -m training.demo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/demo"), help="output folder (its stage folders are replaced)"
    )
    parser.add_argument("--preset", default="tiny-mixtral", help="MoE preset (name or JSON path): the model shape")
    parser.add_argument("--dataset", default=None, help="a local text/json/jsonl/parquet/csv file or a datasets name")
    parser.add_argument("--text_column", default="text", help="text column of --dataset")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting (seconds; used by the tests)")
    parser.add_argument("--seed", type=int, default=0)
    for key, value in DEFAULTS.items():
        parser.add_argument(
            f"--{key}", type=type(value), default=None, help=f"default {value} ({SMOKE.get(key, value)} with --smoke)"
        )
    return parser.parse(argv)


def options(args: argparse.Namespace) -> dict:
    """The demo settings: defaults, smoke settings, then explicit flags."""
    opts = dict(DEFAULTS)
    if args.smoke:
        opts.update({k: v for k, v in SMOKE.items() if k != "config_overrides"})
    opts.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    for key in ("block_size", "batch_size", "dense_steps", "moe_steps", "lora_steps", "corpus_chars"):
        if opts[key] < 1:
            raise UsageError(f"--{key} must be >= 1, got {opts[key]}")
    for key in ("dense_lr", "moe_lr", "lora_lr"):
        if not opts[key] > 0:
            raise UsageError(f"--{key} must be > 0, got {opts[key]}")
    if not 1 <= opts["experts_per_token"] <= opts["num_experts"]:
        raise UsageError(
            f"--experts_per_token must be in [1, --num_experts={opts['num_experts']}], got {opts['experts_per_token']}"
        )
    return opts


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the summary (also written to <out>/summary.json)."""
    args = parse_args(argv)
    opts = options(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    preset = load_preset(args.preset, **(SMOKE["config_overrides"] if args.smoke else {}))
    if opts["block_size"] > preset.max_position_embeddings:
        raise UsageError(
            f"--block_size {opts['block_size']} is above the preset's max_position_embeddings "
            f"({preset.max_position_embeddings})"
        )
    out: Path = check_output_dir(args.out, "--out")
    for name in STAGE_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    start = time.perf_counter()
    stages: list[Stage] = []
    total = 9

    step(1, total, f"text: {'stdlib docstrings' if args.dataset is None else args.dataset} (no download)")
    t = time.perf_counter()
    docs = load_documents(args.dataset, args.text_column, opts["corpus_chars"], out / "cache")
    paths = split_documents(docs, out / "data")
    eval_texts = paths["eval"].read_text(encoding="utf-8").splitlines()
    sizes = {k: len(p.read_text(encoding="utf-8").splitlines()) for k, p in paths.items()}
    print(f"      {len(docs)} documents: pre-training {sizes['pretrain']}, fine-tuning {sizes['finetune']}", end="")
    print(f", evaluation {sizes['eval']}")
    stages.append(Stage("data", f"{len(docs)} docs, {sum(map(len, docs)):,} chars", seconds=time.perf_counter() - t))

    step(2, total, f"tokenizer: byte-level BPE, vocab {preset.vocab_size}")
    t = time.perf_counter()
    pretrain_texts = paths["pretrain"].read_text(encoding="utf-8").splitlines()
    tokenizer = train_byte_level_bpe(pretrain_texts, vocab_size=preset.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    stages.append(Stage("tokenizer", f"byte-level BPE, {len(tokenizer)} tokens", seconds=time.perf_counter() - t))

    step(3, total, f"dense LlamaForCausalLM ({preset.num_hidden_layers} layers, hidden {preset.hidden_size}): training")
    t = time.perf_counter()
    dense, dense_loss = train_dense(dense_config(preset, tokenizer), tokenizer, paths, out / "dense", opts, args.seed)
    dense_ppl, _ = evaluate_model(dense, tokenizer, eval_texts, opts["block_size"], "dense eval")
    stages.append(
        Stage(
            "dense",
            "LlamaForCausalLM, Trainer",
            opts["dense_steps"],
            time.perf_counter() - t,
            dense_ppl,
            params_text(dense),
        )
    )

    step(
        4,
        total,
        f"upcycle: {opts['num_experts']} experts, top-{opts['experts_per_token']}, copied experts, normal router",
    )
    t = time.perf_counter()
    moe = upcycle_dense(dense, tokenizer, out / "upcycled", preset, opts, args.seed).float().eval()
    ids = tokenizer(eval_texts[0], return_tensors="pt").input_ids[:, : opts["block_size"]]
    with torch.no_grad():
        preserved = float((moe(ids).logits - dense(ids).logits).abs().max())
    up_ppl, up_routing = evaluate_model(moe, tokenizer, eval_texts, opts["block_size"], "upcycled eval")
    stages.append(
        Stage(
            "upcycle",
            "modeling_moe.upcycling (copy)",
            "-",
            time.perf_counter() - t,
            up_ppl,
            params_text(moe),
            f"logits = dense (max diff {preserved:.1e}); {routing_text(up_routing)}",
        )
    )

    step(5, total, "MoE training: python -m training.train (MoE losses, router monitor)")
    t = time.perf_counter()
    trained = run_train(paths, out, opts, args.seed)
    moe_trained = MoeForCausalLM.from_pretrained(out / "moe").eval()
    moe_ppl, moe_routing = evaluate_model(moe_trained, tokenizer, eval_texts, opts["block_size"], "MoE eval")
    stages.append(
        Stage(
            "MoE train",
            "training.train",
            trained["global_step"],
            time.perf_counter() - t,
            moe_ppl,
            params_text(moe_trained),
            routing_text(moe_routing),
        )
    )

    step(6, total, "LoRA on the held-out fine-tuning slice: python -m training.finetune_lora --merge")
    t = time.perf_counter()
    tuned = run_lora(paths, out, opts, args.seed)
    merged = MoeForCausalLM.from_pretrained(out / "lora" / "merged").eval()
    drift = tuned["drift"]
    stages.append(
        Stage(
            "LoRA",
            "training.finetune_lora",
            tuned["global_step"],
            time.perf_counter() - t,
            None,
            f"{tuned['trainable_parameters'] / 1e3:.1f}K trainable (LoRA)",
            f"routers unchanged: {not tuned['routers_changed']}; top-k agreement {drift['mean_topk_agreement']:.3f}, "
            f"KL {drift['mean_kl']:.4f}; merged = adapter (max diff {tuned['merge_max_abs_logit_diff']:.1e})",
        )
    )

    step(7, total, "evaluation of the fine-tuned model on the evaluation slice")
    t = time.perf_counter()
    final_ppl, final_routing = evaluate_model(merged, tokenizer, eval_texts, opts["block_size"], "final eval")
    stages.append(
        Stage(
            "final eval",
            "eval.perplexity + eval.routing",
            "-",
            time.perf_counter() - t,
            final_ppl,
            params_text(merged),
            routing_text(final_routing),
        )
    )

    step(8, total, "final Hub-ready model, reloaded with trust_remote_code in a fresh process")
    t = time.perf_counter()
    card = model_card(
        merged,
        "moe-demo",
        description=(
            "Built offline by `python -m training.demo`: a dense LlamaForCausalLM trained on "
            f"{'Python standard-library docstrings' if args.dataset is None else args.dataset}, sparse-upcycled "
            f"to {opts['num_experts']} experts (top-{opts['experts_per_token']}), trained as an MoE, LoRA-fine-tuned "
            f"on a held-out slice with frozen routers and merged. Evaluation perplexity {final_ppl:.2f}."
        ),
        extra_tags=("upcycled", "lora"),
    )
    model_dir = save_hub_ready(merged, out / "model", tokenizer=tokenizer, card=card, overwrite=True)
    remote = fresh_process_generate(model_dir.resolve(), PROMPT)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        local_sum = float(merged(**prompt_ids).logits.double().sum())
    local = merged.generate(**prompt_ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    same_tokens = local[0].tolist() == remote["generated_ids"]
    same_logits = abs(local_sum - remote["logits_sum"]) <= 1e-6 * max(1.0, abs(local_sum))
    print(f"      loaded {remote['class']} from {remote['module']}")
    print(f"      generated: {remote['generated']!r}")
    stages.append(
        Stage(
            "reload",
            "fresh process, trust_remote_code",
            "-",
            time.perf_counter() - t,
            None,
            "",
            f"same logits: {same_logits}; same tokens: {same_tokens}",
        )
    )
    if not (same_tokens and same_logits):
        raise SystemExit("demo failed: the reloaded model differs from the saved one")

    step(9, total, "summary")
    seconds = time.perf_counter() - start
    print(table(stages))
    print(f"\nsample ({PROMPT!r}): {remote['generated']!r}")
    print(f"final model: {model_dir}  |  router heatmap: {out / 'moe_train' / 'router_load_heatmap.png'}")
    print(f"done in {seconds:.1f}s")
    summary = {
        "seconds": seconds,
        "options": opts,
        "preset": args.preset,
        "stages": [vars(s) for s in stages],
        "drift": drift,
        "generated": remote["generated"],
        "model_dir": str(model_dir),
        "same_logits": same_logits,
        "same_tokens": same_tokens,
        "dense_train_loss": dense_loss,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


USER_ERRORS = (DataError, train.TrainArgumentError)

if __name__ == "__main__":
    run_cli(main, PROG, user_errors=USER_ERRORS)
