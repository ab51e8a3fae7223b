#!/usr/bin/env python
"""One MoE layer: our `MoeSparseBlock` vs transformers' `MixtralSparseMoeBlock` vs the dense-equal SwiGLU FFN.

All variants are timed in the same process, interleaved round by round (see `bench/common.py`):

    ours                 modeling_moe.MoeSparseBlock
    hf:eager             transformers' MixtralSparseMoeBlock, experts_implementation "eager" (per-expert loop)
    hf:grouped_mm        ... experts_implementation "grouped_mm" (transformers' default for models; on the CPU
                         torch.nn.functional.grouped_mm is a loop of matmuls)
    dense                transformers' MistralMLP with intermediate size k*f: the same active FLOPs with no
                         routing. It is the denominator of every ratio ("x dense-equal").
    dense:chunked1024    the same dense FFN applied to 1024-token chunks, for information: on the CPU it is
                         cheaper than the plain dense FFN because its intermediates stay in cache.
    ceiling:presorted    the expert GEMMs alone, for information: tokens already sorted into one contiguous
                         chunk per expert, separate weight tensors, no routing, gather, scatter or weighting (the
                         CPU counterpart of the anchors' bare grouped GEMM on pre-sorted tokens), with the
                         GEMM kernels our block uses. Any implementation of the layer that runs one GEMM pair
                         per expert with those kernels costs at least this.
    floor:weight-bytes   few-token shapes, forward, for information: one read of every expert weight the routing
                         hits (a sum over each). With a handful of rows per expert, moving the weights is the
                         cost, and no implementation moves fewer bytes.

Both MoE blocks hold the same weights (the router weight is Mixtral's `gate.weight`; expert tensors have the
same names and layout). Before anything is timed, our output (and, for forward+backward, our input and weight
gradients) must match every transformers implementation; a mismatch stops the run.

Examples:
    python bench/bench_block.py --quick
    python bench/bench_block.py --json outputs/bench_block.json
    python bench/bench_block.py --shapes small fine --dtypes fp32 --modes fwdbwd --rounds 9
    python bench/bench_block.py --device cuda --dtypes bf16
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script (python bench/bench_block.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    DTYPES,
    Timing,
    add_common_args,
    bench_interleaved,
    dtype_name,
    dtype_supported,
    env_info,
    fastest,
    fmt_ratio,
    markdown_table,
    ratio,
    save_json,
    setup_device,
)

HF_IMPLS = ("eager", "grouped_mm")
MODES = ("fwd", "fwdbwd")
# Relative tolerance (max |ours - theirs| / max |theirs|) of the equivalence check, per dtype (bench_gpu_block too).
CHECK_TOL = {"fp32": 1e-4, "bf16": 3e-2}


@dataclass(frozen=True)
class Shape:
    """One MoE layer shape: hidden size d, expert intermediate size f, E experts, top-k, T tokens."""

    d: int
    f: int
    E: int
    k: int
    T: int

    def fwd_flops(self) -> float:
        """Expert FLOPs of one forward pass (router not counted): 2 * T * k * 3 * d * f."""
        return 2.0 * self.T * self.k * 3 * self.d * self.f


SHAPES: dict[str, Shape] = {
    "tiny": Shape(d=256, f=704, E=8, k=2, T=2048),
    "small": Shape(d=512, f=1408, E=8, k=2, T=4096),
    "switch": Shape(d=512, f=2048, E=8, k=1, T=4096),
    "fine": Shape(d=512, f=256, E=64, k=8, T=4096),
    "decode": Shape(d=512, f=1408, E=8, k=2, T=8),
    "decode64": Shape(d=512, f=1408, E=8, k=2, T=64),
}
SHAPE_LABELS = {
    "tiny": "tiny",
    "small": "small",
    "switch": "Switch-like",
    "fine": "fine-grained",
    "decode": "decode-sized",
    "decode64": "batched decode",
}


def target(shape_name: str, dtype: str, mode: str) -> float | None:
    """Project target for ours / dense-equal (issue 7), or None where the project sets none."""
    if shape_name == "decode":
        return 1.5 if mode == "fwd" else None
    if shape_name == "decode64":  # no target of its own: "never slower than transformers" (issue 16) applies
        return None
    return 1.05 if dtype == "fp32" else 1.15


# ---------------------------------------------------------------------------------------------- building
@dataclass
class Blocks:
    """The modules compared for one shape and dtype, all in training mode."""

    ours: torch.nn.Module
    hf: torch.nn.Module
    hf_config: Any
    dense: torch.nn.Module
    ours_config: Any = None


def build_moe_pair(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int, router_std: float):
    """transformers' Mixtral block with initialised weights and our block with a copy of them, built on `device`
    in training mode: (hf, hf_config, ours, ours_config). Shared with bench_gpu_block.py."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from modeling_moe import MoeConfig
    from modeling_moe.modeling_moe import MoeSparseBlock

    d, f, E, k = shape.d, shape.f, shape.E, shape.k
    torch.manual_seed(seed)
    hf_config = MixtralConfig(
        hidden_size=d,
        intermediate_size=f,
        num_local_experts=E,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
        hidden_act="silu",
        experts_implementation="eager",
    )
    ours_config = MoeConfig(
        hidden_size=d,
        intermediate_size=f,
        moe_intermediate_size=f,
        num_local_experts=E,
        num_experts_per_tok=k,
        num_hidden_layers=1,
        num_attention_heads=1,
        hidden_act="silu",
    )
    ours_config._experts_implementation = "eager"  # our own dispatch, as MoeForCausalLM resolves it by default
    with torch.device(device):
        hf = MixtralSparseMoeBlock(hf_config).to(dtype)
        with torch.no_grad():  # MixtralExperts parameters are torch.empty: garbage or denormals would skew timings
            hf.gate.weight.normal_(0.0, router_std)
            hf.experts.gate_up_proj.normal_(0.0, d**-0.5)
            hf.experts.down_proj.normal_(0.0, f**-0.5)
        ours = MoeSparseBlock(ours_config).to(dtype)
    state = {name.replace("gate.weight", "router.weight"): t for name, t in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return hf.train(), hf_config, ours.train(), ours_config


def build_blocks(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int, router_std: float) -> Blocks:
    """Mixtral block with initialised weights, our block with a copy of them, and the dense-equal FFN."""
    from transformers import MistralConfig
    from transformers.models.mistral.modeling_mistral import MistralMLP

    hf, hf_config, ours, ours_config = build_moe_pair(shape, dtype, device, seed, router_std)
    d, f, k = shape.d, shape.f, shape.k
    dense = MistralMLP(MistralConfig(hidden_size=d, intermediate_size=k * f, hidden_act="silu"))
    with torch.no_grad():
        dense.gate_proj.weight.normal_(0.0, d**-0.5)
        dense.up_proj.weight.normal_(0.0, d**-0.5)
        dense.down_proj.weight.normal_(0.0, (k * f) ** -0.5)
    dense = dense.to(device=device, dtype=dtype).train()
    return Blocks(ours=ours, hf=hf, hf_config=hf_config, dense=dense, ours_config=ours_config)


def forward_fns(blocks: Blocks, impls: tuple[str, ...]) -> dict[str, tuple[torch.nn.Module, Any]]:
    """Variant name -> (module whose parameters get gradients, callable input -> output)."""

    def hf_fn(impl: str):
        def fn(x: torch.Tensor) -> torch.Tensor:
            blocks.hf_config._experts_implementation = impl  # the experts module dispatches on this every call
            return blocks.hf(x)

        return fn

    def chunked(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([blocks.dense(c) for c in x.split(1024, dim=1)], dim=1)

    fns: dict[str, tuple[torch.nn.Module, Any]] = {"ours": (blocks.ours, blocks.ours)}
    for impl in impls:
        fns[f"hf:{impl}"] = (blocks.hf, hf_fn(impl))
    fns["dense"] = (blocks.dense, blocks.dense)
    fns["dense:chunked1024"] = (blocks.dense, chunked)
    return fns


def ceiling_variant(blocks: Blocks, x: torch.Tensor, mode: str) -> Any:
    """The "ceiling:presorted" callable: SwiGLU GEMMs per expert on its pre-sorted, contiguous tokens (routing
    taken from the block's router once, outside the timing), with a backward into per-expert leaf tensors. The
    GEMM kernels are our forward's: `F.linear`, and without a backward `experts._linear` (few-row float32)."""
    from modeling_moe.experts import _linear

    D = x.shape[-1]
    experts = blocks.ours.experts
    I = experts.intermediate_dim
    backward = mode == "fwdbwd"
    with torch.no_grad():
        indices = blocks.hf.gate(x.reshape(-1, D))[2]  # (T, K)
        counts = torch.bincount(indices.reshape(-1), minlength=experts.num_experts).tolist()
        order = torch.argsort(indices.reshape(-1), stable=True)
        x_sorted = x.reshape(-1, D).index_select(0, order // indices.shape[1])
    leaf = lambda t: t.detach().clone().requires_grad_(backward)  # noqa: E731
    chunks = [leaf(c) for c in x_sorted.split(counts)]
    w1 = [leaf(experts.gate_up_proj[e]) for e in range(experts.num_experts)]
    w2 = [leaf(experts.down_proj[e]) for e in range(experts.num_experts)]
    grads = [torch.randn(c.shape[0], D, device=x.device, dtype=x.dtype) for c in chunks]
    work = [(e, c, g) for e, (c, g) in enumerate(zip(chunks, grads)) if c.shape[0]]

    def run() -> list[torch.Tensor]:
        linear = torch.nn.functional.linear if backward else _linear  # the GEMM kernels our forward uses
        outs = []
        for e, c, _ in work:
            gate_up = linear(c, w1[e])
            outs.append(linear(torch.nn.functional.silu(gate_up[:, :I]) * gate_up[:, I:], w2[e]))
        return outs

    def call() -> None:
        if not backward:
            with torch.no_grad():
                run()
            return
        for t in (*chunks, *w1, *w2):
            t.grad = None
        torch.autograd.backward(run(), [g for _, _, g in work])

    return call


FLOOR_ROWS_PER_EXPERT = 16  # "floor:weight-bytes" is timed where experts average at most this many rows


def weight_floor_variant(blocks: Blocks, x: torch.Tensor) -> Any:
    """The "floor:weight-bytes" callable, for few-token shapes (None otherwise): one read (a sum) of every expert
    weight that the routing of `x` hits. Any implementation of the layer moves at least these bytes; with a few
    rows per expert that, not arithmetic, is the cost."""
    experts = blocks.ours.experts
    with torch.no_grad():
        indices = blocks.hf.gate(x.reshape(-1, x.shape[-1]))[2]  # (T, K)
    if indices.numel() > FLOOR_ROWS_PER_EXPERT * experts.num_experts:
        return None
    hit = torch.unique(indices).tolist()
    weights = [experts.gate_up_proj[e] for e in hit] + [experts.down_proj[e] for e in hit]

    def call() -> None:
        with torch.no_grad():
            for w in weights:
                w.sum()

    return call


# ---------------------------------------------------------------------------------------------- correctness
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32. Shared with bench_gpu_block."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def outputs_and_grads(
    module: torch.nn.Module, fn: Any, x: torch.Tensor, backward: bool, ours: bool, with_router: bool
) -> dict[str, torch.Tensor]:
    """One block's no-grad output and, if `backward`, its autograd output and the gradients of the input, both
    expert tensors and (`with_router`) the router, named alike for ours and Mixtral. Shared with bench_gpu_block."""
    pairs = {"gate_up_proj": ("experts.gate_up_proj",) * 2, "down_proj": ("experts.down_proj",) * 2}
    if with_router:
        pairs["router"] = ("router.weight", "gate.weight")
    with torch.no_grad():  # the inference path (which may differ from the autograd one) is timed in "fwd"
        found = {"out": fn(x)}
    if not backward:
        return found
    module.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(True)
    out = fn(xg)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    params = dict(module.named_parameters())
    found.update({"out_autograd": out.detach(), "grad_x": xg.grad})
    for label, (ours_name, hf_name) in pairs.items():
        found[f"grad_{label}"] = params[ours_name if ours else hf_name].grad
    module.zero_grad(set_to_none=True)
    return found


def check_equivalence(blocks: Blocks, impls: tuple[str, ...], x: torch.Tensor, dtype: str, backward: bool) -> dict:
    """Compare our output (and gradients, if `backward`) with every transformers implementation.

    Returns {impl: {quantity: relative error}}. Raises SystemExit when an error exceeds `CHECK_TOL[dtype]`.
    With k = 1 the router gradient is not compared: Mixtral renormalises the single kept weight to 1, so that
    gradient is zero up to rounding and a relative error of it is meaningless.
    """
    fns = forward_fns(blocks, impls)
    with_router = blocks.hf.top_k > 1

    def run(name: str) -> dict[str, torch.Tensor]:
        return outputs_and_grads(*fns[name], x, backward, ours=name == "ours", with_router=with_router)

    ours = run("ours")
    report: dict[str, dict[str, float]] = {}
    failures = []
    for impl in impls:
        theirs = run(f"hf:{impl}")
        report[impl] = {key: rel_err(ours[key], theirs[key]) for key in ours}
        failures += [f"{impl}:{key} rel.err {err:.2e}" for key, err in report[impl].items() if err > CHECK_TOL[dtype]]
    if failures:
        raise SystemExit(f"our MoeSparseBlock disagrees with transformers' Mixtral ({dtype}): " + "; ".join(failures))
    return report


def routing_load(hf_block: torch.nn.Module, x: torch.Tensor) -> float:
    """Max over mean of the assignments per expert that the Mixtral block `hf_block` makes for input `x` (1.0 =
    perfectly balanced). Shared with bench_gpu_block."""
    with torch.no_grad():
        _, _, indices = hf_block.gate(x.reshape(-1, x.shape[-1]))
        counts = torch.bincount(indices.reshape(-1), minlength=hf_block.experts.num_experts).float()
    return (counts.max() / counts.mean()).item()


# ---------------------------------------------------------------------------------------------- timing
def block_call(module: torch.nn.Module, fn: Any, x: torch.Tensor, mode: str, grad_out: torch.Tensor) -> Any:
    """A zero-argument callable running `fn` once on `x`: forward under no_grad ("fwd"), or forward+backward of
    `grad_out` with `module`'s gradients and the input's cleared first ("fwdbwd"). Shared with bench_gpu_block."""
    if mode == "fwd":

        def call() -> None:
            with torch.no_grad():
                fn(x)

        return call
    xg = x.detach().clone().requires_grad_(True)

    def call() -> None:
        module.zero_grad(set_to_none=True)
        xg.grad = None
        fn(xg).backward(grad_out)

    return call


def timed_variants(blocks: Blocks, impls: tuple[str, ...], x: torch.Tensor, mode: str) -> dict[str, Any]:
    """Variant name -> zero-argument callable running one forward (no_grad) or one forward+backward."""
    grad_out = torch.randn_like(x)  # contiguous upstream gradient (grouped_mm's backward rejects expanded ones)
    variants = {
        name: block_call(module, fn, x, mode, grad_out) for name, (module, fn) in forward_fns(blocks, impls).items()
    }
    variants["ceiling:presorted"] = ceiling_variant(blocks, x, mode)
    floor = weight_floor_variant(blocks, x) if mode == "fwd" else None
    if floor is not None:
        variants["floor:weight-bytes"] = floor
    return variants


def summarise(shape_name: str, dtype: str, mode: str, res: dict[str, Timing]) -> dict[str, Any]:
    """Medians and the three headline ratios of one (shape, dtype, mode) cell."""
    ours, dense, chunked = res["ours"], res["dense"], res["dense:chunked1024"]
    hf_best = fastest(res, "hf:")
    row: dict[str, Any] = {
        "shape": shape_name,
        "dtype": dtype,
        "mode": mode,
        "variants": {name: t.summary() for name, t in res.items()},
        "hf_best": hf_best.name if hf_best else None,
        "ours_over_dense": ratio(ours, dense),
        "ours_over_dense_chunked": ratio(ours, chunked),
        "ceiling_over_dense": ratio(res["ceiling:presorted"], dense),
        "floor_over_dense": ratio(res["floor:weight-bytes"], dense) if "floor:weight-bytes" in res else None,
        "hf_best_over_dense": ratio(hf_best, dense) if hf_best else (float("nan"),) * 3,
        "ours_over_hf_best": ratio(ours, hf_best) if hf_best else (float("nan"),) * 3,
        "target_ours_over_dense": target(shape_name, dtype, mode),
    }
    goal = row["target_ours_over_dense"]
    row["meets_target"] = None if goal is None else bool(row["ours_over_dense"][0] <= goal)
    return row


def print_cell(row: dict[str, Any], flops: float) -> None:
    """Per-variant times and the cell's ratios."""
    for name, s in row["variants"].items():
        if s["error"]:
            print(f"    {name:<20s} error: {s['error']}")
            continue
        gflops = flops / (s["median_ms"] / 1e3) / 1e9
        print(
            f"    {name:<20s} median {s['median_ms']:9.3f} ms  [{s['min_ms']:.3f}..{s['max_ms']:.3f}]  "
            f"{gflops:7.1f} GFLOP/s  quiet {s['quiet_rounds']}/{s['rounds']}"
        )
    goal = row["target_ours_over_dense"]
    verdict = "" if goal is None else f"  (target <= {goal:.2f}: {'met' if row['meets_target'] else 'MISSED'})"
    print(f"    ours / dense-equal          {fmt_ratio(row['ours_over_dense'])}{verdict}")
    print(f"    {row['hf_best'] or 'hf'} / dense-equal  {fmt_ratio(row['hf_best_over_dense'])}")
    print(f"    ours / {row['hf_best'] or 'hf'}         {fmt_ratio(row['ours_over_hf_best'])}")
    print(f"    ours / dense:chunked1024    {fmt_ratio(row['ours_over_dense_chunked'])}")
    print(f"    ceiling:presorted / dense   {fmt_ratio(row['ceiling_over_dense'])}", flush=True)
    if row["floor_over_dense"] is not None:
        print(f"    floor:weight-bytes / dense  {fmt_ratio(row['floor_over_dense'])}", flush=True)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of every measured cell."""
    header = [
        "shape (d, f, E, k, T)",
        "dtype",
        "mode",
        "ours ms",
        "hf best (ms)",
        "dense ms",
        "ours / dense",
        "hf best / dense",
        "ours / hf best",
        "ceiling / dense",
        "floor / dense",
        "target",
    ]
    body = []
    for r in rows:
        v, s = r["variants"], SHAPES[r["shape"]]
        goal = r["target_ours_over_dense"]
        verdict = "-" if goal is None else f"<= {goal:.2f} {'met' if r['meets_target'] else '**missed**'}"
        hf = r["hf_best"]
        body.append(
            [
                f"{SHAPE_LABELS[r['shape']]} ({s.d}, {s.f}, {s.E}, {s.k}, {s.T})",
                r["dtype"],
                r["mode"],
                f"{v['ours']['median_ms']:.2f}",
                f"{hf.removeprefix('hf:')} ({v[hf]['median_ms']:.2f})" if hf else "n/a",
                f"{v['dense']['median_ms']:.2f}",
                f"{r['ours_over_dense'][0]:.2f}",
                f"{r['hf_best_over_dense'][0]:.2f}",
                f"{r['ours_over_hf_best'][0]:.2f}",
                f"{r['ceiling_over_dense'][0]:.2f}",
                f"{r['floor_over_dense'][0]:.2f}" if r["floor_over_dense"] is not None else "-",
                verdict,
            ]
        )
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="default: all")
    parser.add_argument("--dtypes", nargs="+", type=dtype_name, default=["fp32", "bf16"], help="fp32 and/or bf16")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="fwd and/or fwdbwd")
    parser.add_argument("--impls", nargs="+", default=list(HF_IMPLS), help="transformers experts implementations")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shape, 3 short rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--router-std", type=float, default=0.02, help="std of the router weight init")
    add_common_args(parser, rounds=7, block_s=0.3)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.rounds, args.block_s, args.warmup = ["tiny"], 3, 0.05, 1
    warnings.filterwarnings("ignore")
    impls = tuple(args.impls)

    device = setup_device(args.device, args.threads)
    env = env_info(device)
    print(env, flush=True)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for dtype in args.dtypes:
            if why := dtype_supported(device, DTYPES[dtype], backward=False):
                skipped.append({"shape": shape_name, "dtype": dtype, "mode": "all", "why": why})
                print(f"\n=== {shape_name} {dtype}: skipped, {dtype} unsupported on {device} ({why})")
                continue
            modes = list(args.modes)
            if "fwdbwd" in modes and (why := dtype_supported(device, DTYPES[dtype], backward=True)):
                modes.remove("fwdbwd")
                skipped.append({"shape": shape_name, "dtype": dtype, "mode": "fwdbwd", "why": why})
                print(f"\n=== {shape_name} {dtype} fwdbwd: skipped, backward unsupported on {device} ({why})")
            if not modes:
                continue
            blocks = build_blocks(shape, DTYPES[dtype], device, args.seed, args.router_std)
            x = torch.randn(1, shape.T, shape.d, device=device, dtype=DTYPES[dtype])
            check = check_equivalence(blocks, impls, x, dtype, backward="fwdbwd" in modes)
            worst = max(err for errs in check.values() for err in errs.values())
            print(
                f"\n=== {SHAPE_LABELS[shape_name]} {asdict(shape)} {dtype} on {device} | fwd "
                f"{shape.fwd_flops() / 1e9:.2f} GFLOP | routing load max/mean {routing_load(blocks.hf, x):.2f} | "
                f"ours == Mixtral ({', '.join(impls)}): worst rel.err {worst:.1e} ===",
                flush=True,
            )
            for mode in modes:
                print(f"  -- {mode}", flush=True)
                res = bench_interleaved(
                    timed_variants(blocks, impls, x, mode),
                    device,
                    rounds=args.rounds,
                    warmup=args.warmup,
                    block_s=args.block_s,
                    wait_quiet_s=args.wait_quiet,
                )
                row = summarise(shape_name, dtype, mode, res)
                row["check_rel_err"] = check
                rows.append(row)
                print_cell(row, shape.fwd_flops() * (1 if mode == "fwd" else 3))
            del blocks, x

    table = summary_table(rows)
    print("\n" + table, flush=True)
    if args.json:
        shapes = {name: asdict(SHAPES[name]) for name in args.shapes}
        save_json(args.json, {"env": env, "args": vars(args), "shapes": shapes, "results": rows, "skipped": skipped})


if __name__ == "__main__":
    main()
