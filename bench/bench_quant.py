#!/usr/bin/env python
"""Weight-only quantized experts (`modeling_moe.quantize_experts`): memory, quality and decode speed against the
full-precision model, all measured in the same run.

    memory       weight bytes as stored (`modeling_moe.accounting.weight_bytes`, scales included) of the
                 mixtral-8x7b preset (meta device, nothing allocated) and of the timed model, for fp32 / bf16 /
                 int8 / int4 experts (the rest of the model in bf16 for Mixtral, fp32 / bf16 for the timed
                 model), and the weight bytes one token reads at batch-1 decode: every non-expert weight plus
                 k of the E experts per MoE layer.
    perplexity   the demo's trained MoE (`training.demo`: stdlib docstrings, upcycled and trained; run here
                 unless `--demo_out` already holds it) on the demo's held-out evaluation text (`data/eval.txt`,
                 `eval.perplexity`), full precision against int8 and int4 experts.
    block        one decode-sized MoE layer (`MoeSparseBlock`, d=512, f=1408, E=8, k=2; T=1 and T=8 tokens),
                 eval mode, no grad: fp32 and bf16 float experts against int8 and int4 experts (activations
                 fp32 or bf16). Ratios are against fp32 float experts timed in the same rounds.
    decode       batch-1 greedy `generate()` (dynamic cache, 16-token prompt, 32 new tokens) of the bench_model
                 shape (hidden 256, 4 layers, 8 experts of 704, top-2, vocab 4096, random weights), same
                 variants; tokens/s and the ratio to fp32.

Timing protocol: `bench/common.py` (interleaved rounds, contended rounds left out).

Examples:
    python bench/bench_quant.py --json outputs/bench_quant.json
    python bench/bench_quant.py --quick          # smoke run: a random tiny model for perplexity, short rounds
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_common_args, bench_interleaved, env_info, fmt_ratio, markdown_table, ratio, save_json
from modeling_moe import MoeConfig, MoeForCausalLM, load_preset, quantize_experts
from modeling_moe.accounting import weight_bytes
from modeling_moe.modeling_moe import MoeSparseBlock

SCHEMES = {"int8": dict(dtype="int8"), "int4": dict(dtype="int4", group_size=32)}
BLOCK_SHAPE = dict(hidden_size=512, moe_intermediate_size=1408, num_local_experts=8, num_experts_per_tok=2)
MODEL_SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=704,
    moe_intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    pad_token_id=0,
)
# (label, float dtype of the model, quantization scheme or None)
VARIANTS = [
    ("fp32", torch.float32, None),
    ("bf16", torch.bfloat16, None),
    ("int8 (fp32 act)", torch.float32, "int8"),
    ("int8 (bf16 act)", torch.bfloat16, "int8"),
    ("int4 g32 (fp32 act)", torch.float32, "int4"),
    ("int4 g32 (bf16 act)", torch.bfloat16, "int4"),
]


def with_experts(model: torch.nn.Module, dtype: torch.dtype, scheme: str | None) -> torch.nn.Module:
    """A copy of `model` in `dtype`, its experts quantized with `scheme` (None: float)."""
    out = copy.deepcopy(model).to(dtype)
    return quantize_experts(out, **SCHEMES[scheme]) if scheme else out


# ------------------------------------------------------------------ memory
def decode_bytes_per_token(config: MoeConfig, sizes: dict[str, int]) -> int:
    """Weight bytes one token reads at batch-1 decode: all non-expert weights, k/E of the experts."""
    experts = sizes["experts"] * config.num_experts_per_tok / config.num_local_experts
    return round(sum(v for c, v in sizes.items() if c != "experts") + experts)


def memory_rows(name: str, config: MoeConfig, rest_dtypes: tuple[torch.dtype, ...]) -> list[dict[str, Any]]:
    rows = []
    for rest in rest_dtypes:
        for label, scheme in (("float", None), ("int8", "int8"), ("int4", "int4")):
            values = config.to_dict()
            for key in ("model_type", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype"):
                values.pop(key, None)
            values["expert_quantization"] = None
            if scheme:
                values["expert_quantization"] = {"bits": 8} if scheme == "int8" else {"bits": 4, "group_size": 32}
            with torch.device("meta"):
                model = MoeForCausalLM(MoeConfig(**values)).to(rest)
            sizes = weight_bytes(model)
            experts_label = str(rest).removeprefix("torch.") if scheme is None else label
            rows.append(
                {
                    "model": name,
                    "rest": str(rest).removeprefix("torch."),
                    "experts": experts_label,
                    "total_bytes": sum(sizes.values()),
                    "expert_bytes": sizes["experts"],
                    "decode_bytes_per_token": decode_bytes_per_token(model.config, sizes),
                }
            )
    return rows


# ------------------------------------------------------------------ perplexity
def demo_model(demo_out: Path, quick: bool, demo_args: list[str]) -> tuple[Path, Path]:
    """(trained MoE folder, held-out text file) of the demo, run into `demo_out` unless it is there already."""
    model_dir, eval_file = demo_out / "moe", demo_out / "data" / "eval.txt"
    if not (model_dir / "config.json").exists() or not eval_file.exists():
        from training import demo

        demo.main(["--out", str(demo_out), *(["--smoke"] if quick else []), *demo_args])
    return model_dir, eval_file


def perplexities(model_dir: Path, eval_file: Path, block_size: int) -> dict[str, float]:
    from transformers import AutoTokenizer

    from eval.perplexity import evaluate_perplexity, tokenize_documents

    tokenizer = AutoTokenizer.from_pretrained(model_dir.parent / "tokenizer")
    texts = [t for t in eval_file.read_text(encoding="utf-8").splitlines() if t.strip()]
    docs = tokenize_documents(texts, tokenizer)
    base = MoeForCausalLM.from_pretrained(model_dir).float().eval()
    out = {}
    for label, scheme in (("fp32", None), ("bf16", "bf16"), ("int8", "int8"), ("int4 g32", "int4")):
        if scheme == "bf16":
            model = copy.deepcopy(base).to(torch.bfloat16)
        else:
            model = with_experts(base, torch.float32, scheme)
        with torch.no_grad():
            result = evaluate_perplexity(
                model, docs, texts, max_length=block_size, batch_size=8, pad_id=tokenizer.pad_token_id, desc=label
            )
        out[label] = result.perplexity
    out["tokens"] = result.num_tokens
    return out


# ------------------------------------------------------------------ timing
def block_variants(T: int, quick: bool) -> dict[str, Any]:
    shape = dict(BLOCK_SHAPE, hidden_size=64, moe_intermediate_size=128) if quick else BLOCK_SHAPE
    config = MoeConfig(
        vocab_size=128, intermediate_size=shape["moe_intermediate_size"], num_hidden_layers=1,
        num_attention_heads=4, **shape,
    )  # fmt: skip
    torch.manual_seed(0)
    block = MoeSparseBlock(config).eval()
    with torch.no_grad():
        block.router.weight.normal_(std=0.02)
        block.experts.gate_up_proj.normal_(std=0.02)
        block.experts.down_proj.normal_(std=0.02)
    x = torch.randn(1, T, config.hidden_size)
    fns = {}
    for label, dtype, scheme in VARIANTS:
        wrapper = torch.nn.Module()
        wrapper.mlp = with_experts(block, dtype, None)
        if scheme:
            wrapper.config = copy.deepcopy(config)
            quantize_experts(wrapper, **SCHEMES[scheme])  # the scales stay float32
        module, xd = wrapper.mlp, x.to(dtype)

        def call(module=module, xd=xd):
            with torch.no_grad():
                module(xd)

        fns[label] = call
    return fns


def decode_variants(quick: bool, new_tokens: int) -> dict[str, Any]:
    small = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=128)
    shape = dict(MODEL_SHAPE, **small) if quick else MODEL_SHAPE
    torch.manual_seed(0)
    model = MoeForCausalLM(MoeConfig(**shape)).eval()
    ids = torch.randint(3, shape["vocab_size"], (1, 16))
    fns = {}
    for label, dtype, scheme in VARIANTS:
        variant = with_experts(model, dtype, scheme).eval()

        def call(variant=variant):
            with torch.no_grad():
                variant.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        fns[label] = call
    return fns


def timing_rows(results, anchor: str, per_call: float) -> list[dict[str, Any]]:
    rows = []
    for label, t in results.items():
        r = ratio(t, results[anchor])
        rows.append({"variant": label, "median_ms": t.median * 1e3, "per_s": per_call / t.median, "ratio": r})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, rounds=7, block_s=0.5)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, demo --smoke, 3 short rounds")
    parser.add_argument("--demo_out", type=Path, default=Path("outputs/bench_quant_demo"), help="demo folder")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument(
        "--demo_args", default="", help="extra training.demo flags, e.g. '--dense_steps 100 --moe_steps 60'"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.block_s, args.warmup, args.new_tokens = 3, 0.05, 1, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type != "cpu":
        raise SystemExit("bench_quant.py measures the CPU paths; --device must be cpu")
    results: dict[str, Any] = {"env": env_info(device)}
    print(f"env: {results['env']['cpu']}, torch {results['env']['torch']}, {torch.get_num_threads()} threads")

    # memory
    memory = memory_rows("mixtral-8x7b", load_preset("mixtral-8x7b"), (torch.bfloat16,))
    memory += memory_rows("bench_model shape", MoeConfig(**MODEL_SHAPE), (torch.float32, torch.bfloat16))
    results["memory"] = memory
    print("\n== weight memory")
    print(
        markdown_table(
            ["model", "rest", "experts", "total", "experts", "decode bytes / token"],
            [
                [r["model"], r["rest"], r["experts"], _size(r["total_bytes"]), _size(r["expert_bytes"]),
                 _size(r["decode_bytes_per_token"])]
                for r in memory
            ],
        )
    )  # fmt: skip

    # perplexity
    model_dir, eval_file = demo_model(args.demo_out, args.quick, args.demo_args.split())
    ppl = perplexities(model_dir, eval_file, block_size=32 if args.quick else 64)
    results["perplexity"] = ppl
    print(f"\n== perplexity on the demo's held-out text ({ppl['tokens']:,} tokens), {model_dir}")
    print(markdown_table(["experts", "perplexity", "vs fp32"], [
        [k, f"{v:.4f}", f"{v / ppl['fp32']:.4f}"] for k, v in ppl.items() if k != "tokens"
    ]))  # fmt: skip

    timing = dict(rounds=args.rounds, warmup=args.warmup, block_s=args.block_s, wait_quiet_s=args.wait_quiet)
    for T in (1, 8):
        print(f"\n== decode-sized block, T={T}")
        res = bench_interleaved(block_variants(T, args.quick), device, **timing)
        rows = timing_rows(res, "fp32", per_call=1.0)
        results[f"block_T{T}"] = [dict(r, timing=res[r["variant"]].summary()) for r in rows]
        print(markdown_table(["variant", "median ms", "time / fp32"], [
            [r["variant"], f"{r['median_ms']:.3f}", fmt_ratio(r["ratio"])] for r in rows
        ]))  # fmt: skip

    print(f"\n== batch-1 decode, {args.new_tokens} new tokens")
    res = bench_interleaved(decode_variants(args.quick, args.new_tokens), device, **timing)
    rows = timing_rows(res, "fp32", per_call=args.new_tokens)
    results["decode"] = [dict(r, timing=res[r["variant"]].summary()) for r in rows]
    print(markdown_table(["variant", "median ms", "new tokens/s", "time / fp32"], [
        [r["variant"], f"{r['median_ms']:.1f}", f"{r['per_s']:.1f}", fmt_ratio(r["ratio"])] for r in rows
    ]))  # fmt: skip
    if args.json:
        save_json(args.json, results)
    return results


def _size(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


if __name__ == "__main__":
    main()
