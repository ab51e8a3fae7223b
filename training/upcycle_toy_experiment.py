"""Sparse upcycling's central claim at toy scale, on CPU in a few minutes (Komatsuzaki et al. 2022, Sec. 4).

1. Train a small dense `LlamaForCausalLM` on real text: the docstrings of Python's standard library (no download),
   with a byte-level BPE trained on the same training split.
2. From that checkpoint, continue training (a) the dense model and (b) its upcycled MoE (`modeling_moe.upcycle`,
   copy init: it starts with exactly the dense model's loss) for the same number of steps, same data order, same
   optimiser and learning rate.
3. Report held-out cross-entropy (router losses excluded) along the way and plot both curves to a PNG.

    python -m training.upcycle_toy_experiment            # writes outputs/upcycle_toy.png and outputs/upcycle_toy.json

Each MoE step runs k = 2 experts per token, so it costs more FLOPs than a dense step; the claim tested here is the
issue's "same number of steps", and the summary reports active and total parameters alongside. The stdlib docstring
corpus is about 430k characters (about 150k tokens at vocabulary 1024), so each phase of 300 steps x 16 x 64 tokens
is about two epochs; the eval split is held-out paragraphs. About 3 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_moe.accounting import count_parameters
from modeling_moe.cli import CliParser, UsageError, check_output_dir, run_cli
from modeling_moe.corpus import stdlib_paragraphs
from modeling_moe.upcycling import EXPERT_INIT_NAMES, upcycle
from training.tokenizer import train_byte_level_bpe


@dataclass
class ToyArguments:
    """Sizes and schedule of the toy experiment (defaults: a few minutes on 2 CPU cores)."""

    corpus_chars: int = field(default=1_500_000, metadata={"help": "characters of stdlib docstrings"})
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    seq_len: int = 64
    batch_size: int = 16
    dense_steps: int = field(default=300, metadata={"help": "dense pre-training steps"})
    continue_steps: int = field(default=300, metadata={"help": "steps of each continuation (dense and MoE)"})
    lr: float = 2e-3
    continue_lr: float = 1e-3
    num_experts: int = 4
    num_experts_per_tok: int = 2
    expert_init: str = "copy"
    router_aux_loss_coef: float = 0.01
    eval_every: int = 50
    eval_blocks: int = 64
    seed: int = 0
    threads: int = 2
    out_dir: str = "outputs"
    name: str = "upcycle_toy"


def token_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate the tokenised texts (each starts with <s>) and cut into (N, seq_len) blocks."""
    ids = [i for t in texts for i in tokenizer(t)["input_ids"]]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy on `blocks` (router losses excluded)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        x = blocks[start : start + batch_size]
        logits = model(x).logits[:, :-1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def train(model, blocks, eval_blocks, args, steps: int, lr: float, seed: int, label: str, evaluate=None) -> list:
    """AdamW with linear warm-up (5%) and cosine decay; returns [(step, eval loss)] including step 0.

    `evaluate(model) -> float` replaces the default `eval_loss(model, eval_blocks, args.batch_size)`."""
    if evaluate is None:
        evaluate = lambda m: eval_loss(m, eval_blocks, args.batch_size)  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    order = torch.randint(len(blocks), (steps, args.batch_size), generator=torch.Generator().manual_seed(seed))
    curve = [(0, evaluate(model))]
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = blocks[order[step - 1]]
        loss = model(x, labels=x).loss  # the MoE adds its router losses here
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == steps:
            curve.append((step, evaluate(model)))
            print(f"[{label}] step {step}/{steps} eval CE {curve[-1][1]:.4f} ({time.perf_counter() - start:.0f} s)")
    return curve


def plot(pre: list, dense: list, moe: list, path: Path, title: str) -> None:
    """Pre-training curve (negative steps) then both continuations, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offset = pre[-1][0]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([s - offset for s, _ in pre], [v for _, v in pre], color="gray", label="dense pre-training")
    ax.plot([s for s, _ in dense], [v for _, v in dense], marker="o", ms=3, label="continue dense")
    ax.plot([s for s, _ in moe], [v for _, v in moe], marker="o", ms=3, label="continue upcycled MoE")
    ax.axvline(0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("step (0 = upcycling point)")
    ax.set_ylabel("held-out cross-entropy")
    lo = min(v for _, v in dense + moe)
    ax.set_ylim(lo - 0.1, max(v for _, v in dense + moe) + 0.6)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


PROG = "python -m training.upcycle_toy_experiment"


def check_arguments(args: ToyArguments) -> None:
    """Refuse sizes and rates that cannot run, naming the argument and the allowed range."""
    for name, value in asdict(args).items():
        if isinstance(value, int) and name != "seed" and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    for name in ("lr", "continue_lr"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name} must be > 0, got {getattr(args, name)}")
    if not args.router_aux_loss_coef >= 0:
        raise UsageError(f"--router_aux_loss_coef must be >= 0, got {args.router_aux_loss_coef}")
    if args.expert_init not in EXPERT_INIT_NAMES:
        raise UsageError(f"--expert_init must be one of {sorted(EXPERT_INIT_NAMES)}, got {args.expert_init!r}")
    if args.num_experts_per_tok > args.num_experts:
        raise UsageError(f"--num_experts_per_tok {args.num_experts_per_tok} is above --num_experts {args.num_experts}")
    if args.hidden_size % args.num_heads:
        raise UsageError(f"--hidden_size {args.hidden_size} must be a multiple of --num_heads {args.num_heads}")
    if not args.name or "/" in args.name:
        raise UsageError(f"--name must be a file name without '/', got {args.name!r}")
    check_output_dir(args.out_dir, "--out_dir")


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; write `{out_dir}/{name}.png` and `.json`; return the summary."""
    (args,) = CliParser(ToyArguments, prog=PROG).parse(argv)
    check_arguments(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    texts = stdlib_paragraphs(max_chars=args.corpus_chars)
    n_eval = max(1, len(texts) // 20)
    train_texts, eval_texts = texts[n_eval:], texts[:n_eval]
    tokenizer = train_byte_level_bpe(train_texts, args.vocab_size)
    blocks = token_blocks(train_texts, tokenizer, args.seq_len)
    eval_blocks = token_blocks(eval_texts, tokenizer, args.seq_len)[: args.eval_blocks]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=args.seq_len,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    dense = LlamaForCausalLM(config)
    pre = train(dense, blocks, eval_blocks, args, args.dense_steps, args.lr, args.seed, "dense pre-train")
    moe = upcycle(
        dense,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        expert_init=args.expert_init,
        router_init="normal",
        seed=args.seed,
        config_overrides={"router_aux_loss_coef": args.router_aux_loss_coef},
    )
    start_moe = eval_loss(moe, eval_blocks, args.batch_size)
    seed = args.seed + 1  # both continuations see the same batches
    dense_curve = train(dense, blocks, eval_blocks, args, args.continue_steps, args.continue_lr, seed, "dense")
    moe_curve = train(moe.train(), blocks, eval_blocks, args, args.continue_steps, args.continue_lr, seed, "moe")
    counts = count_parameters(moe)
    summary = {
        "args": asdict(args),
        "train_tokens": blocks.numel(),
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "moe_total_params": counts.total_params,
        "moe_active_params": counts.active_params,
        "dense_loss_at_upcycling": pre[-1][1],
        "moe_loss_at_upcycling": start_moe,
        "final_dense": dense_curve[-1][1],
        "final_moe": moe_curve[-1][1],
        "moe_lower": moe_curve[-1][1] < dense_curve[-1][1],
        "curves": {"pretrain": pre, "dense": dense_curve, "moe": moe_curve},
    }
    out = Path(args.out_dir)
    title = (
        f"stdlib docstrings, Llama {args.num_layers}x{args.hidden_size}, continue {args.continue_steps} steps: "
        f"dense {summary['final_dense']:.3f} vs MoE {args.num_experts}x top-{args.num_experts_per_tok} "
        f"{summary['final_moe']:.3f}"
    )
    plot(pre, dense_curve, moe_curve, out / f"{args.name}.png", title)
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    print(
        json.dumps({k: v for k, v in summary.items() if k not in ("curves", "args")}),
    )
    return summary


USER_ERRORS = ()

if __name__ == "__main__":
    run_cli(main, PROG, user_errors=USER_ERRORS)
