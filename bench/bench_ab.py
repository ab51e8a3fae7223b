#!/usr/bin/env python
"""A/B: our MoE block in the working tree against the same block at another git revision, in one process.

Two separate `bench_block.py` runs on a shared 2-core machine move a cell by up to ~15%, which hides a change
worth a few percent. This script builds our `MoeSparseBlock` twice, from the working tree ("new") and from
`modeling_moe/` at `--rev` ("old", extracted with `git archive` into a temporary package), gives both the same
weights and input, checks that they agree, and times them interleaved round by round (`bench/common.py`)
together with the weight-bytes floor on few-token shapes. It prints new / old and each over the floor; ratios
compare timings taken in the same round.

Only `modeling_moe/` comes from the revision (with an empty package `__init__`, so nothing is registered with
the Auto classes twice); the benchmark code and the shapes are the working tree's (`bench_block.py`).

Examples:
    python bench/bench_ab.py --quick
    python bench/bench_ab.py --shapes decode --dtypes bf16 --modes fwd
    python bench/bench_ab.py --rev HEAD~3 --shapes decode small --rounds 11 --json /tmp/ab.json
"""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script (python bench/bench_ab.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_block import (
    MODES,
    SHAPE_LABELS,
    SHAPES,
    Blocks,
    block_call,
    build_blocks,
    rel_err,
    weight_floor_variant,
)
from bench.common import (
    DTYPES,
    add_common_args,
    bench_interleaved,
    dtype_name,
    env_info,
    fmt_ratio,
    markdown_table,
    ratio,
    save_json,
    setup_device,
)

REPO = Path(__file__).resolve().parent.parent
# Largest max |new - old| / max |old| accepted before timing, per dtype: a change meant to be faster only is
# expected to give the same bits (reported), and one that changes the numerics must stay this close.
AB_TOL = {"fp32": 1e-5, "bf16": 1e-2}


def revision_package(rev: str, into: Path) -> Any:
    """`modeling_moe/` at git revision `rev`, importable as its own package (module `modeling_moe_<sha>`)."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", sha, "modeling_moe"], capture_output=True, check=True
        ).stdout
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"--rev {rev!r}: not a revision of {REPO} with modeling_moe/ ({err.stderr!s:.200})") from err
    name = f"modeling_moe_{sha[:10]}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "modeling_moe").rename(into / name)
    (into / name / "__init__.py").write_text("")  # no Auto-class registration; submodules import each other
    sys.path.insert(0, str(into))
    return sha, importlib.import_module(f"{name}.modeling_moe"), importlib.import_module(f"{name}.configuration_moe")


def old_block(new: torch.nn.Module, new_config: Any, modeling: Any, configuration: Any) -> torch.nn.Module:
    """The revision's `MoeSparseBlock` with the same config and a copy of `new`'s weights and mode."""
    fields = {k: v for k, v in new_config.to_dict().items() if k not in ("transformers_version", "model_type")}
    config = configuration.MoeConfig(**fields)
    config._experts_implementation = "eager"  # our own dispatch, as in bench_block.build_moe_pair
    parameter = next(new.parameters())
    with torch.device(parameter.device):
        block = modeling.MoeSparseBlock(config).to(parameter.dtype)
    block.load_state_dict(new.state_dict(), strict=True)
    return block.train(new.training)


def agreement(new: torch.nn.Module, old: torch.nn.Module, x: torch.Tensor) -> tuple[bool, float]:
    """(bitwise equal, max |new - old| / max |old|) of the two blocks' no-grad outputs on `x`."""
    with torch.no_grad():
        a, b = new(x), old(x)
    return torch.equal(a, b), rel_err(a, b)


def time_cell(new, old, hf, x, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """new, old (and, forward on few-token shapes, the weight-bytes floor) interleaved: timings and ratios."""
    grad_out = torch.randn_like(x)
    variants = {name: block_call(m, m, x, mode, grad_out) for name, m in (("new", new), ("old", old))}
    floor = weight_floor_variant(Blocks(ours=new, hf=hf, hf_config=None, dense=None), x) if mode == "fwd" else None
    if floor is not None:
        variants["floor:weight-bytes"] = floor
    res = bench_interleaved(variants, device, args.rounds, args.warmup, args.block_s, args.wait_quiet, verbose=False)
    over_floor = {n: ratio(res[n], res["floor:weight-bytes"]) for n in ("new", "old")} if floor is not None else {}
    return {
        "mode": mode,
        "timings": {name: t.summary() for name, t in res.items()},
        "new_over_old": ratio(res["new"], res["old"]),
        "over_floor": over_floor,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="git revision of modeling_moe/ to compare with (default HEAD)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["decode"], help="default: decode")
    parser.add_argument("--dtypes", nargs="+", type=dtype_name, default=["fp32", "bf16"], help="fp32 and/or bf16")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fwd"], help="fwd and/or fwdbwd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--router-std", type=float, default=0.02, help="std of the router weight init")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shape, fp32 forward, 3 short rounds")
    add_common_args(parser, rounds=15, block_s=0.3)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.dtypes, args.modes = ["tiny"], ["fp32"], ["fwd"]
        args.rounds, args.block_s, args.warmup = 3, 0.05, 1
    warnings.filterwarnings("ignore")
    device = setup_device(args.device, args.threads)
    env = env_info(device)
    print(env, flush=True)
    rows, table = [], []
    with tempfile.TemporaryDirectory(prefix="bench_ab_") as tmp:
        sha, modeling, configuration = revision_package(args.rev, Path(tmp))
        print(f"old: modeling_moe/ at {args.rev} ({sha[:10]}); new: the working tree", flush=True)
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            for dtype in args.dtypes:
                # built as bench_block.py builds its cell (the dense FFN too), so the input and routing are the same
                blocks = build_blocks(shape, DTYPES[dtype], device, args.seed, args.router_std)
                hf, new = blocks.hf, blocks.ours
                x = torch.randn(1, shape.T, shape.d, device=device, dtype=DTYPES[dtype])
                old = old_block(new, blocks.ours_config, modeling, configuration)
                same, err = agreement(new, old, x)
                label = f"{SHAPE_LABELS[shape_name]} {dtype}"
                print(f"\n=== {label}: new {'==' if same else '!='} old bitwise, rel.err {err:.1e} ===", flush=True)
                if err > AB_TOL[dtype]:
                    raise SystemExit(f"{label}: new and old disagree (rel.err {err:.1e} > {AB_TOL[dtype]:.0e})")
                for mode in args.modes:
                    row = time_cell(new, old, hf, x, mode, args, device)
                    row.update(shape=shape_name, dtype=dtype, bitwise_equal=same, rel_err=err)
                    rows.append(row)
                    over = row["over_floor"]
                    table.append(
                        [
                            label,
                            mode,
                            f"{row['timings']['new']['median_ms']:.3f}",
                            f"{row['timings']['old']['median_ms']:.3f}",
                            fmt_ratio(row["new_over_old"]),
                            fmt_ratio(over["new"]) if over else "-",
                            fmt_ratio(over["old"]) if over else "-",
                        ]
                    )
                    print(f"  {mode}: new / old {fmt_ratio(row['new_over_old'])}", flush=True)
                del blocks, hf, new, old, x
    header = ["cell", "mode", "new ms", "old ms", "new / old", "new / floor", "old / floor"]
    print("\n" + markdown_table(header, table), flush=True)
    if args.json:
        save_json(args.json, {"env": env, "args": vars(args), "rev": sha, "results": rows})


if __name__ == "__main__":
    main()
