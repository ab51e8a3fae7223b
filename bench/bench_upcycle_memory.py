"""Peak memory of streaming upcycling at 7B width, measured on a subprocess, extrapolated to a full 7B x 8 model.

1. Writes a synthetic dense Llama checkpoint (bf16, hidden 4096, intermediate 14336, 32 heads / 8 KV heads, a few
   layers, a small vocabulary) as safetensors shards of `--layers_per_shard` layers each, one tensor at a time.
2. Runs `python -m training.upcycle` on it (8 experts, top-2, copy init, every layer MoE) in a subprocess, after a
   baseline subprocess that only imports the same modules.
3. Reads the subprocess's peak resident set size with `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` (RSS, not
   an address-space limit: memory-mapped safetensors reserve address space they never make resident), and
   compares it with the size of the upcycled weights and with "largest input shard + one upcycled layer".
4. Extrapolates to a full 7B dense model (Mistral-7B shape: 32 layers, vocab 32000) upcycled to 8 experts.

    python bench/bench_upcycle_memory.py --layers 2 4 8 --results /tmp/upcycle_memory.md  # section for RESULTS.md

Needs about (max layers * 3.4 GB) free disk under --workdir (checked first); everything written is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from modeling_moe.accounting import count_parameters  # noqa: E402
from modeling_moe.upcycling import UpcycleOptions, moe_config_from_dense  # noqa: E402

GiB = 1024**3
WIDTH_7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)


def layer_shapes(config: LlamaConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Dense Llama decoder layer i: key -> shape."""
    D, I, d = config.hidden_size, config.intermediate_size, config.head_dim
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (D,),
        p + "post_attention_layernorm.weight": (D,),
        p + "self_attn.q_proj.weight": (H * d, D),
        p + "self_attn.k_proj.weight": (Hkv * d, D),
        p + "self_attn.v_proj.weight": (Hkv * d, D),
        p + "self_attn.o_proj.weight": (D, H * d),
        p + "mlp.gate_proj.weight": (I, D),
        p + "mlp.up_proj.weight": (I, D),
        p + "mlp.down_proj.weight": (D, I),
    }


def write_synthetic_dense(folder: Path, layers: int, vocab: int, layers_per_shard: int) -> LlamaConfig:
    """A dense bf16 Llama checkpoint written shard by shard (never more than one shard in memory)."""
    config = LlamaConfig(**WIDTH_7B, num_hidden_layers=layers, vocab_size=vocab, dtype="bfloat16")
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    groups = [list(range(s, min(s + layers_per_shard, layers))) for s in range(0, layers, layers_per_shard)]
    head = {"model.embed_tokens.weight": (vocab, config.hidden_size), "model.norm.weight": (config.hidden_size,)}
    head["lm_head.weight"] = (vocab, config.hidden_size)
    units = [head] + [{k: v for i in g for k, v in layer_shapes(config, i).items()} for g in groups]
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for n, shapes in enumerate(units):
        name = f"model-{n + 1:05d}-of-{len(units):05d}.safetensors"
        tensors = {}
        for key, shape in shapes.items():
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[key] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return config


# A stdlib-only launcher runs the measured command as its only child and reports getrusage(RUSAGE_CHILDREN). It is
# needed because Linux starts a child (vfork / fork) inside its parent's address space and records that space's
# high-water RSS into the child's ru_maxrss at exec: measured straight from this process (which holds torch and
# wrote the synthetic shards), every child would report at least this process's own peak.
LAUNCHER = """
import json, resource, subprocess, sys
with open(sys.argv[1], "w") as out:
    rc = subprocess.run(sys.argv[2:], stdout=out).returncode
print(json.dumps({"rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def child_peak_rss(cmd: list[str], stdout_file: Path) -> tuple[int, float, str]:
    """Run `cmd` under the launcher; return (its peak RSS in bytes, wall seconds, its stdout)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(stdout_file), *cmd], cwd=REPO_ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    report = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {"rc": -1}
    if result.returncode != 0 or report["rc"] != 0:
        raise RuntimeError(f"{cmd} failed:\n{result.stderr[-3000:]}")
    return report["maxrss_kib"] * 1024, wall, stdout_file.read_text()  # Linux: ru_maxrss is in KiB


def full_7b_extrapolation() -> dict[str, float]:
    """Sizes of a Mistral-7B-shaped dense model upcycled to 8 experts (top-2, all layers), bf16, in bytes."""
    dense = LlamaConfig(**WIDTH_7B, num_hidden_layers=32, vocab_size=32000)
    moe = moe_config_from_dense(dense, UpcycleOptions(num_experts=8).validate(32, 14336, False))
    total = count_parameters(moe).total_params * 2
    D, I = 4096, 14336
    dense_layer = (2 * D + 2 * D * D + 2 * 1024 * D + 3 * D * I) * 2
    moe_layer = (2 * D + 2 * D * D + 2 * 1024 * D + 8 * 3 * D * I + 8 * D) * 2
    return {"moe_total": total, "dense_layer": dense_layer, "moe_layer": moe_layer, "shard_5GB": 5e9}


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def measure(layers: int, args: argparse.Namespace) -> dict:
    """Write a `layers`-deep synthetic dense checkpoint, upcycle it in a measured subprocess, check and delete it."""
    work = Path(tempfile.mkdtemp(prefix="bench-upcycle-", dir=args.workdir))
    try:
        dense_dir, out_dir = work / "dense", work / "moe"
        write_synthetic_dense(dense_dir, layers, args.vocab, args.layers_per_shard)
        baseline_cmd = [sys.executable, "-c", "import modeling_moe.upcycling, training.upcycle"]
        baseline, _, _ = child_peak_rss(baseline_cmd, work / "baseline.out")
        cmd = [sys.executable, "-m", "training.upcycle", "--dense", str(dense_dir), "--out_dir", str(out_dir)]
        cmd += ["--num_experts", str(args.num_experts), "--num_experts_per_tok", "2", "--expert_init", "copy"]
        peak, wall, stdout = child_peak_rss(cmd, work / "upcycle.out")
        summary = json.loads(stdout.strip().splitlines()[-1])
        # spot check: expert E-1 of the last layer holds the dense gate projection
        key, dense_key = (
            f"model.layers.{layers - 1}.mlp.experts.gate_up_proj",
            f"model.layers.{layers - 1}.mlp.gate_proj.weight",
        )
        out_map = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
        dense_map = json.loads((dense_dir / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(out_dir / out_map[key], "pt") as f, safe_open(dense_dir / dense_map[dense_key], "pt") as g:
            assert torch.equal(f.get_slice(key)[args.num_experts - 1 :, :4][0], g.get_slice(dense_key)[:4])
        return {
            "layers": layers,
            "peak": peak,
            "baseline": baseline,
            "wall": wall,
            "weights": summary["weight_bytes"],
            "largest_in": max(p.stat().st_size for p in dense_dir.glob("*.safetensors")),
            "largest_out": max(p.stat().st_size for p in out_dir.glob("*.safetensors")),
            "dense_layer": sum(math.prod(s) * 2 for s in layer_shapes(LlamaConfig(**WIDTH_7B), 0).values()),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(rows: list[dict], args: argparse.Namespace, cmd_line: str) -> str:
    """The markdown section."""
    ext = full_7b_extrapolation()
    baseline = max(r["baseline"] for r in rows)
    dense_layer, moe_layer = rows[0]["dense_layer"], rows[0]["largest_out"]
    ext_model = baseline + ext["dense_layer"] + ext["moe_layer"]
    ext_bound = baseline + ext["shard_5GB"] + ext["moe_layer"]
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    lines = [
        "## Upcycling memory (streaming conversion)",
        "",
        f"- Machine: {lscpu_model()}, {ram:.0f} GiB RAM; torch {torch.__version__}; date: {date}",
        f"- Command: `{cmd_line}`",
        f"- Synthetic dense Llama, bf16: hidden 4096, intermediate 14336, 32 heads / 8 KV heads, vocab {args.vocab}, "
        f"safetensors shards of {args.layers_per_shard} layers; one dense layer = {dense_layer / GiB:.2f} GiB.",
        f"- Each upcycled in a subprocess with `python -m training.upcycle --num_experts {args.num_experts} "
        "--num_experts_per_tok 2 --expert_init copy` (every layer MoE; one output shard per layer, the largest "
        f"= one MoE layer = {moe_layer / GiB:.2f} GiB). Peak RSS = `getrusage(RUSAGE_CHILDREN).ru_maxrss` read by a "
        "stdlib-only launcher whose only child is the command; baseline = the same for a command that only imports "
        f"torch, transformers and the package ({baseline / GiB:.2f} GiB).",
        "",
        "| dense layers | upcycled weights (GiB) | largest input shard + one upcycled layer (GiB) | **peak RSS (GiB)** "
        "| peak - baseline (GiB) | peak / weights | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bound = r["largest_in"] + r["largest_out"]
        lines.append(
            f"| {r['layers']} | {r['weights'] / GiB:.2f} | {bound / GiB:.2f} | **{r['peak'] / GiB:.2f}** | "
            f"{(r['peak'] - r['baseline']) / GiB:.2f} | {r['peak'] / r['weights']:.2f} | {r['wall']:.0f} |"
        )
    lines += [
        "",
        "The peak stays flat as the model gets deeper while the weights grow linearly: it is the baseline plus the "
        "dense tensors of one layer plus one upcycled layer (only the tensors of the unit being converted are read "
        "from a shard, so even the whole input shard is never resident), so peak - baseline stays below the "
        'design bound "largest input shard + one upcycled layer".',
        "",
        f"**Full 7B extrapolation** (Mistral-7B shape: 32 layers, vocab 32000, upcycled to 8 experts top-2, bf16): "
        f"upcycled weights {ext['moe_total'] / GiB:.1f} GiB; one upcycled layer {ext['moe_layer'] / GiB:.2f} GiB. "
        f"Predicted peak: baseline + one dense layer + one upcycled layer = {ext_model / GiB:.1f} GiB "
        f"({ext_model / ext['moe_total'] * 100:.0f}% of the weights); even the design bound with 5 GB input shards, "
        f"baseline + shard + layer, is {ext_bound / GiB:.1f} GiB. Converting in memory instead needs the whole "
        f"{ext['moe_total'] / GiB:.0f} GiB plus the dense model.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="depths to measure")
    parser.add_argument("--layers_per_shard", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--results", default=None, help="markdown file to write the result section to")
    args = parser.parse_args()

    per_layer_disk = (3 * 4096 * 14336 * (1 + args.num_experts) + 4096 * 10240 * 2) * 2
    need = max(args.layers) * per_layer_disk * 1.1
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        sys.exit(f"need {need / GiB:.1f} GiB free under {args.workdir}, have {free / GiB:.1f} GiB")
    rows = [measure(n, args) for n in args.layers]
    cmd_line = "python bench/bench_upcycle_memory.py " + " ".join(sys.argv[1:])
    text = report(rows, args, cmd_line.strip())
    print(text)
    if args.results:
        Path(args.results).write_text("# Upcycling benchmark results\n\n" + text)


if __name__ == "__main__":
    main()
