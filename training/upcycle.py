"""`python -m training.upcycle`: turn a dense Llama / Mistral / Qwen2 checkpoint folder into a Hub-ready MoE folder.

Streams the conversion (one dense tensor set and one output shard at a time, see `modeling_moe.upcycling`), so
it runs on a machine with far less memory than the upcycled model. Example:

    python -m training.upcycle --dense path/to/llama --out_dir outputs/llama-8x --num_experts 8 \
        --num_experts_per_tok 2 --moe_layers every_other --expert_init drop_upcycling --drop_ratio 0.5

Prints one JSON line: the output folder, the parameter counts and the bytes of weights written. A user error
(missing folder, `--out_dir` that is, contains or lies inside `--dense`, bad option) exits with status 2 and one
`python -m training.upcycle: error: ...` line before anything is read or written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from modeling_moe.accounting import count_parameters
from modeling_moe.cli import CliParser, check_output_dir, run_cli
from modeling_moe.configuration_moe import ROUTER_TYPES, MoeConfig
from modeling_moe.hub import check_disjoint
from modeling_moe.upcycling import (
    EXPERT_INIT_NAMES,
    ROUTER_INIT_NAMES,
    SPLIT_MODES,
    UpcyclingError,
    upcycle_to_folder,
)


@dataclass
class UpcycleArguments:
    """Command-line arguments; each maps onto the `modeling_moe.upcycle` argument of the same name."""

    dense: str = field(metadata={"help": "dense checkpoint folder (config.json + safetensors; Llama/Mistral/Qwen2)"})
    out_dir: str = field(metadata={"help": "output folder (written atomically)"})
    num_experts: int = field(default=8, metadata={"help": "experts per MoE layer (E)"})
    num_experts_per_tok: int = field(default=2, metadata={"help": "experts per token (k <= E; 1 for switch)"})
    router_type: str = field(default="topk_softmax", metadata={"choices": list(ROUTER_TYPES)})
    moe_layers: str = field(
        default="all", metadata={"help": "'all', 'every_other' (layers 1, 3, ...) or comma-separated indices"}
    )
    expert_init: str = field(default="copy", metadata={"choices": list(EXPERT_INIT_NAMES)})
    noise_std: float = field(default=0.0, metadata={"help": "copy: noise std in units of each dense matrix's std"})
    drop_ratio: float = field(default=0.5, metadata={"help": "drop_upcycling: fraction of neurons re-initialised"})
    split_mode: str = field(default="random", metadata={"choices": list(SPLIT_MODES)})
    split_down_scale: float | None = field(default=None, metadata={"help": "neuron_split: down scale (default E)"})
    shared_expert: bool = field(default=False, metadata={"help": "keep the dense FFN as an always-on shared expert"})
    shared_expert_weight: float = field(default=0.5, metadata={"help": "shared expert's share w of the output"})
    router_init: str = field(default="normal", metadata={"choices": list(ROUTER_INIT_NAMES)})
    router_std: float | None = field(default=None, metadata={"help": "normal: std (default initializer_range)"})
    router_scale: float = field(default=1.0, metadata={"help": "hidden: logit scale of a typical token"})
    calibration_file: str | None = field(
        default=None,
        metadata={"help": "hidden: text file, one document per line, or 'stdlib' for the stdlib docstrings"},
    )
    calibration_max_tokens: int = field(default=4096, metadata={"help": "hidden: calibration tokens"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: the dense folder's)"})
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the dense model, for the model card"})
    seed: int = 0
    overwrite: bool = field(default=False, metadata={"help": "replace an existing out_dir"})


def parse_moe_layers(value: str) -> str | list[int]:
    """'all' / 'every_other' unchanged, '0,2,5' -> [0, 2, 5].

    Raises:
        UpcyclingError: anything else.
    """
    if value in ("all", "every_other"):
        return value
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UpcyclingError(
            f"--moe_layers must be 'all', 'every_other' or comma-separated layer indices, got {value!r}"
        ) from None


def read_calibration(path: str | None) -> list[str] | None:
    """Calibration documents: None, the stdlib docstrings ('stdlib'), or the non-empty lines of a text file."""
    if path is None:
        return None
    if path == "stdlib":
        from modeling_moe.corpus import stdlib_paragraphs

        return stdlib_paragraphs(max_chars=400_000)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--calibration_file {file} does not exist")
    return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


PROG = "python -m training.upcycle"


def validate_paths(args: UpcycleArguments) -> None:
    """Checks of the folders before anything is read: --dense exists, --out_dir is writable and apart from it."""
    dense = Path(args.dense)
    if not dense.is_dir():
        raise FileNotFoundError(f"--dense: no such folder {args.dense!r} (a dense checkpoint folder)")
    check_disjoint(dense, args.out_dir, "--dense", "--out_dir")
    out = check_output_dir(args.out_dir, "--out_dir")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out_dir {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer: no such folder {args.tokenizer!r}")


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default sys.argv[1:]), upcycle, and return (and print) a JSON-able summary."""
    (args,) = CliParser(UpcycleArguments, prog=PROG).parse(argv)
    validate_paths(args)
    moe_layers = parse_moe_layers(args.moe_layers)
    calibration = read_calibration(args.calibration_file)
    out = upcycle_to_folder(
        args.dense,
        args.out_dir,
        overwrite=args.overwrite,
        tokenizer=args.tokenizer,
        calibration_texts=calibration,
        base_model=args.base_model,
        progress=True,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        router_type=args.router_type,
        moe_layers=moe_layers,
        expert_init=args.expert_init,
        noise_std=args.noise_std,
        drop_ratio=args.drop_ratio,
        split_mode=args.split_mode,
        split_down_scale=args.split_down_scale,
        shared_expert=args.shared_expert,
        shared_expert_weight=args.shared_expert_weight,
        router_init=args.router_init,
        router_std=args.router_std,
        router_scale=args.router_scale,
        calibration_max_tokens=args.calibration_max_tokens,
        seed=args.seed,
    )
    counts = count_parameters(MoeConfig.from_pretrained(out))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    summary = {
        "out_dir": str(out),
        "total_params": counts.total_params,
        "active_params": counts.active_params,
        "weight_bytes": index["metadata"]["total_size"],
        "shards": len(set(index["weight_map"].values())),
    }
    print(json.dumps(summary))
    return summary


USER_ERRORS = (UpcyclingError,)

if __name__ == "__main__":
    run_cli(main, PROG, user_errors=USER_ERRORS)
