"""`python -m eval` / `python -m eval.run`: evaluate an MoE model's quality, routing behaviour and cost, and write
`results.json`, `token_losses.jsonl` and a self-contained `report.html` to `--output_dir`.

    python -m eval --model outputs/demo/model --output_dir outputs/eval
    python -m eval --model my-moe --compare_model my-dense --dataset data.txt --max_length 512 --stride 256

Arguments are the fields of `EvalArguments` (transformers' `HfArgumentParser`); `--help` lists them. Every
argument, path and lm-eval task is checked before any model is run; a user error exits with status 2 and one
`python -m eval: error: ...` line. Outputs are all or nothing: nothing is written to `--output_dir` until every
result is computed. A model folder that ships its own code (other than this repository's) is loaded only with
`--trust_remote_code`.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import set_seed

from modeling_moe.cli import CliParser, check_device, check_output_dir, run_cli
from modeling_moe.corpus import write_corpus

from . import cost as cost_lib
from . import routing as routing_lib
from .lm_eval_adapter import SHIPPED_TASKS, check_tasks, run_lm_eval
from .loading import (
    EvalInputError,
    LoadedModel,
    check_model_source,
    is_local_folder,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from .perplexity import (
    PerplexityResult,
    check_window,
    compare_token_losses,
    evaluate_perplexity,
    load_texts,
    model_max_length,
    tokenize_documents,
)
from .report import atomic_write_text, write_html, write_json

PROG = "python -m eval"


@dataclass
class EvalArguments:
    """Command-line arguments of the evaluation harness."""

    model: str = field(metadata={"help": "Model folder (ours, Hub-style with remote code, or a Mixtral) or Hub id."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where results.json and report.html go."})
    compare_model: str | None = field(
        default=None, metadata={"help": "Optional second model (dense before upcycling, base before LoRA, ...)."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder; default: the model folder's."})
    compare_tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer of --compare_model."})
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Local .txt (one text per line) / .json / .jsonl / .csv / .parquet file or a datasets name. "
            "Default: Python standard-library docstrings written to OUTPUT_DIR/corpus.txt (offline real text)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "datasets configuration name."})
    split: str = field(default="train", metadata={"help": "Dataset split."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    max_samples: int | None = field(default=200, metadata={"help": "Evaluate on at most this many texts."})
    max_length: int | None = field(
        default=None, metadata={"help": "Window length in tokens; default min(model context, 1024)."}
    )
    stride: int | None = field(default=None, metadata={"help": "Sliding-window step; default max_length // 2."})
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16."})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda."})
    routing_max_tokens: int = field(default=16384, metadata={"help": "Tokens routed for the routing statistics."})
    top_tokens: int = field(default=8, metadata={"help": "Tokens listed per expert in the 'what experts learn' table."})
    capacity_sweep: str = field(
        default="auto", metadata={"help": "auto (models with capacity or Switch routing), on or off."}
    )
    capacity_factors: list[float] = field(
        default_factory=lambda: list(routing_lib.DEFAULT_CAPACITY_FACTORS),
        metadata={"help": "Eval capacity factors of the sweep."},
    )
    cost: bool = field(default=True, metadata={"help": "Measure throughput against transformers' Mixtral."})
    cost_batch_size: int = field(default=4, metadata={"help": "Batch size of the throughput measurement."})
    cost_seq_len: int = field(default=64, metadata={"help": "Prompt length of the throughput measurement."})
    cost_new_tokens: int = field(default=16, metadata={"help": "Generated tokens per sequence when timing."})
    cost_rounds: int = field(default=5, metadata={"help": "Timed rounds (interleaved with the Mixtral reference)."})
    lm_eval_tasks: str = field(
        default=",".join(SHIPPED_TASKS),
        metadata={"help": "Comma-separated lm-eval tasks ('' skips). Shipped offline: " + ", ".join(SHIPPED_TASKS)},
    )
    lm_eval_limit: float | None = field(default=None, metadata={"help": "Examples per lm-eval task (None = all)."})
    lm_eval_num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples for lm-eval."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run modeling code shipped in --model / --compare_model folders (auto_map). Off: installed "
            "classes only; this repository's models never need it."
        },
    )

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype, "dtype")
        if self.capacity_sweep not in ("auto", "on", "off"):
            raise EvalInputError(f"capacity_sweep must be auto, on or off, got {self.capacity_sweep!r}")
        positive = ("batch_size", "routing_max_tokens", "top_tokens")
        for name in (*positive, "cost_batch_size", "cost_seq_len", "cost_new_tokens", "cost_rounds"):
            if getattr(self, name) < 1:
                raise EvalInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise EvalInputError(f"max_samples must be >= 1 (or None for all), got {self.max_samples}")
        if self.max_length is not None and self.max_length < 2:
            raise EvalInputError(f"max_length must be >= 2 tokens (or omitted: the model's), got {self.max_length}")
        if self.stride is not None and not 1 <= self.stride <= (self.max_length or self.stride):
            raise EvalInputError(f"stride must be in [1, max_length] (or omitted: max_length // 2), got {self.stride}")
        bad = [f for f in self.capacity_factors if not f > 0]
        if bad or not self.capacity_factors:
            raise EvalInputError(f"capacity_factors must be one or more numbers > 0, got {self.capacity_factors}")
        if self.lm_eval_limit is not None and not self.lm_eval_limit > 0:
            raise EvalInputError(
                f"lm_eval_limit must be > 0 (an example count, or a fraction < 1), got {self.lm_eval_limit}"
            )
        if self.lm_eval_num_fewshot is not None and self.lm_eval_num_fewshot < 0:
            raise EvalInputError(f"lm_eval_num_fewshot must be >= 0, got {self.lm_eval_num_fewshot}")
        check_device(self.device, "device")

    @property
    def task_list(self) -> list[str]:
        """`lm_eval_tasks` as a list (empty = skip)."""
        return [t.strip() for t in self.lm_eval_tasks.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    """Parse command-line arguments into `EvalArguments`. Raises `UsageError` (unknown flag, bad value)."""
    (args,) = CliParser(EvalArguments, prog=PROG).parse(argv)
    return args


def check_before_work(args: EvalArguments) -> Path:
    """What can be checked before any model is loaded: the output folder is writable, the dataset file (if a
    local path) exists, the lm-eval tasks exist. Returns the output folder."""
    out_dir = check_output_dir(args.output_dir, "output_dir")
    check_model_source(args.model, "model")
    if args.compare_model:
        check_model_source(args.compare_model, "compare_model")
    for name in ("tokenizer", "compare_tokenizer"):
        value = getattr(args, name)
        if value and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
            raise EvalInputError(f"{name}: {value!r} is a file; give a tokenizer folder")
    if args.dataset and args.dataset.startswith((".", "/", "~")) and not Path(args.dataset).expanduser().exists():
        raise EvalInputError(f"dataset: no such file {args.dataset!r}")
    if args.task_list:
        check_tasks(args.task_list)
    return out_dir


def publish(staging: Path, out_dir: Path) -> None:
    """Copy every file of `staging` into `out_dir`, each through a temporary name and `os.replace`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted(staging.iterdir()):
        tmp = out_dir / f".{src.name}.{os.getpid()}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, out_dir / src.name)


# ------------------------------------------------------------------------------------------------- steps
def evaluation_texts(args: EvalArguments, out_dir: Path | None = None) -> list[str]:
    """The texts to evaluate on (see `EvalArguments.dataset`); the default corpus is written to `out_dir`
    (default `--output_dir`) as corpus.txt."""
    source = args.dataset
    if source is None:
        folder = Path(args.output_dir) if out_dir is None else out_dir
        source = str(write_corpus(folder / "corpus.txt", max_chars=400_000))
    return load_texts(source, args.dataset_config, args.split, args.text_column, args.max_samples)


def same_vocabulary(a, b) -> bool:
    """True when two tokenizers map the same strings to the same ids."""
    return a is b or a.get_vocab() == b.get_vocab()


def loss_histogram(deltas: list[float], bins: int = 40) -> dict:
    """{"counts", "edges"} of a histogram of per-token loss differences."""
    counts, edges = np.histogram(np.asarray(deltas, dtype=np.float64), bins=bins)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def write_token_losses(path: Path, result: PerplexityResult, compare: PerplexityResult | None) -> Path:
    """One JSON line per document: token ids and each token's loss (and the compared model's), atomically."""
    lines = []
    for d, (ids, losses) in enumerate(zip(result.token_ids, result.token_losses)):
        row = {"doc": d, "token_ids": ids, "loss": losses}
        if compare is not None:
            row["compare_loss"] = compare.token_losses[d]
        lines.append(json.dumps(row))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def resolve_window(args: EvalArguments, models: list[LoadedModel]) -> tuple[int, int]:
    """(max_length, stride) from the arguments and the models' contexts; raises `EvalInputError`."""
    limits = [m for m in (model_max_length(lm.model) for lm in models) if m is not None]
    max_length = args.max_length or min([1024, *limits])
    stride = args.stride or max(1, max_length // 2)
    for lm in models:
        check_window(max_length, stride, model_max_length(lm.model))
    return max_length, stride


def run(args: EvalArguments) -> dict:
    """Run every enabled part of the evaluation, write the outputs (all at the end), and return the results."""
    out_dir = check_before_work(args)
    with tempfile.TemporaryDirectory(prefix="moe-eval-") as staging:
        results = _run(args, Path(staging))
        publish(Path(staging), out_dir)
    return results


def _run(args: EvalArguments, out_dir: Path) -> dict:
    """`run`, writing its files to `out_dir` (a staging folder)."""
    set_seed(args.seed)
    notes: list[str] = []
    trust = args.trust_remote_code
    loaded = load_model(args.model, args.dtype, args.device, "model", trust)
    tokenizer = load_tokenizer(args.tokenizer, args.model, "tokenizer", trust)
    compare = None
    if args.compare_model:
        compare = load_model(args.compare_model, args.dtype, args.device, "compare_model", trust)
    compare_tok = None
    if compare is not None:
        compare_tok = load_tokenizer(
            args.compare_tokenizer or args.tokenizer, args.compare_model, "compare_tokenizer", trust
        )
    max_length, stride = resolve_window(args, [loaded] + ([compare] if compare else []))
    texts = evaluation_texts(args, out_dir)
    docs = tokenize_documents(texts, tokenizer)
    pad_id = tokenizer.pad_token_id or 0

    results: dict = {
        "meta": {
            "model": args.model,
            "compare_model": args.compare_model,
            "model_kind": loaded.kind,
            "dataset": args.dataset or "Python standard-library docstrings (modeling_moe.corpus)",
            "texts": len(texts),
            "dtype": args.dtype,
            "device": args.device,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "args": asdict(args),
        },
        "notes": notes,
    }
    if loaded.converted_from:
        notes.append(f"{args.model} is a transformers Mixtral, converted with modeling_moe.convert.from_mixtral")

    # quality
    quality = evaluate_perplexity(loaded.model, docs, texts, max_length, stride, args.batch_size, pad_id, "model")
    results["quality"] = {"models": {"model": quality.summary()}}
    compare_quality = None
    if compare is not None:
        shared = same_vocabulary(tokenizer, compare_tok)
        compare_docs = docs if shared else tokenize_documents(texts, compare_tok)
        compare_quality = evaluate_perplexity(
            compare.model,
            compare_docs,
            texts,
            max_length,
            stride,
            args.batch_size,
            compare_tok.pad_token_id or 0,
            "compare",
        )
        results["quality"]["models"]["compare_model"] = compare_quality.summary()
        if shared:
            comparison = compare_token_losses(quality, compare_quality)
            comparison["histogram"] = loss_histogram(comparison.pop("deltas"))
            results["quality"]["token_comparison"] = comparison
        else:
            notes.append("the two models use different tokenizers: no token-by-token or routing comparison")
    write_token_losses(
        out_dir / "token_losses.jsonl",
        quality,
        compare_quality if compare and compare_quality.token_ids == quality.token_ids else None,
    )

    # routing
    if loaded.has_routing:
        capture = routing_lib.collect_routing(
            loaded.model, docs, max_length, args.batch_size, args.routing_max_tokens, pad_id
        )
        routing = routing_lib.routing_summary(capture, tokenizer, args.top_tokens)
        sweep = args.capacity_sweep == "on" or (
            args.capacity_sweep == "auto" and routing_lib.has_capacity(loaded.model)
        )
        if sweep:
            routing["capacity_sweep"] = routing_lib.capacity_sweep(
                loaded.model, docs, max_length, args.capacity_factors, args.batch_size, args.routing_max_tokens, pad_id
            )
        if compare is not None and compare.has_routing and same_vocabulary(tokenizer, compare_tok):
            other = routing_lib.collect_routing(
                compare.model, docs, max_length, args.batch_size, args.routing_max_tokens, pad_id, "compare routing"
            )
            try:
                routing["comparison"] = routing_lib.compare_routing(capture, other)
            except EvalInputError as err:
                notes.append(str(err))
        elif compare is not None:
            notes.append(
                "the compared model records no routing (or uses another tokenizer): routing comparison skipped"
            )
        results["routing"] = routing
    else:
        notes.append(f"{args.model} is not an MoE model of this repository: routing statistics skipped")

    # cost
    results["cost"] = {"parameters": cost_lib.parameter_report(loaded.model)}
    if args.cost and loaded.has_routing:
        results["cost"]["throughput"] = cost_lib.throughput_report(
            loaded.model, args.cost_batch_size, args.cost_seq_len, args.cost_new_tokens, args.cost_rounds
        )

    # standard benchmarks
    if args.task_list:
        local = is_local_folder(args.model)  # lm-eval loads a folder itself; anything else is handed over in memory
        limit = int(args.lm_eval_limit) if args.lm_eval_limit and args.lm_eval_limit >= 1 else args.lm_eval_limit
        results["lm_eval"] = run_lm_eval(
            args.model if local else loaded.model,
            args.task_list,
            tokenizer=args.tokenizer if local else (args.tokenizer or tokenizer),
            limit=limit,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            max_length=max_length,
            num_fewshot=args.lm_eval_num_fewshot,
            seed=args.seed,
            trust_remote_code=trust,
        )

    write_json(results, out_dir / "results.json")
    write_html(results, out_dir / "report.html")
    return results


def summary_lines(results: dict, out_dir: str) -> list[str]:
    """Human-readable headline numbers of a results dict."""
    lines = []
    for name, q in results["quality"]["models"].items():
        lines.append(
            f"quality[{name}]: perplexity {q['perplexity']:.3f}, bits/byte {q['bits_per_byte']:.4f} on "
            f"{q['num_tokens']:,} tokens of {q['num_documents']} texts (window {q['max_length']}, stride {q['stride']})"
        )
    routing = results.get("routing")
    if routing:
        for s in routing["layers"]:
            lines.append(
                f"routing[layer {s['layer']}]: load CV {s['load_cv']:.3f}, load entropy {s['load_entropy']:.3f}, "
                f"top-1 prob {s['top1_prob']:.3f}, margin {s['margin']:.3f}, dropped {s['dropped_fraction']:.2%}, "
                f"dead {s['dead_experts']}"
            )
        agreement = ", ".join(f"{a:.3f}" for a in routing["consecutive_layer_agreement"])
        lines.append(f"routing: consecutive-layer agreement [{agreement}]")
    params = results["cost"]["parameters"]
    memory = params["weight_memory_bytes"]
    lines.append(
        f"cost: {params['total_params']:,} parameters, {params['active_params']:,} active; weights "
        f"{memory['bf16'] / 2**20:.2f} MiB bf16, {memory['fp32'] / 2**20:.2f} MiB fp32, "
        f"{params['loaded_weight_bytes']['total'] / 2**20:.2f} MiB as loaded"
        + (f" (expert_quantization={params['expert_quantization']})" if params["expert_quantization"] else "")
    )
    tp = results["cost"].get("throughput")
    if tp:
        for key in ("forward", "generate"):
            t = tp[key]
            lines.append(
                f"cost[{key}]: ours {t['ours_tokens_per_s']:,.0f} tok/s, "
                f"Mixtral {t['mixtral_tokens_per_s']:,.0f} tok/s (Mixtral time / ours = {t['speed_ratio']:.2f})"
            )
    for task, metrics in (results.get("lm_eval") or {}).get("results", {}).items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "stderr" not in k and k != "sample_len")
        lines.append(f"lm-eval[{task}]: {shown}")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    out = Path(out_dir)
    lines.append(f"wrote {out / 'results.json'}, {out / 'token_losses.jsonl'}, {out / 'report.html'}")
    return lines


def _main(argv: list[str] | None) -> dict:
    args = parse_args(argv)
    results = run(args)
    print("\n".join(summary_lines(results, args.output_dir)))
    return results


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: parse, run, print the headline numbers. A user error exits with status 2 and one line
    `python -m eval: error: ...` (`MOE_DEBUG=1` shows the traceback)."""
    return run_cli(_main, PROG, argv, user_errors=(EvalInputError,))


if __name__ == "__main__":
    main()
