"""Soft MoE (causal Mixture of Tokens) against top-2 routing at equal active FLOPs, at toy scale on CPU.

Both models are `MoeForCausalLM`s of the same shape (every layer MoE, E experts of the same size), trained from
scratch on the demo's data (the docstrings of Python's standard library, a byte-level BPE trained on the training
split) for the same steps, batches and optimiser (`training.upcycle_toy_experiment.train`).

Equal active FLOPs in training: top-k runs k expert rows per token; Soft MoE runs E * slots_per_expert slot rows
per group of G tokens, i.e. E * slots / G per token (defaults: 4 * 1 / 2 = 2 = k). The router / dispatch / combine
cost (O(E * slots * D) per token for both) is small next to the experts' 3 * D * I per row.

Soft MoE is evaluated twice at every eval step: with the training grouping (G sequences of an eval batch per
group: the function it was trained as) and with G = 1 (what `generate()` and the default eval mode compute:
the dense soft mixture, E * slots expert rows per token). Finally it is converted to sparse top-k
(`modeling_moe.soft_conversion.soft_to_topk`, same experts, router from Phi) and fine-tuned for a few steps
("transition tuning", Antoniak et al. 2023); the top-k baseline continues for the same steps, so both end with
the same number of steps.

    python -m training.soft_moe_toy_experiment --seeds 0 1   # writes outputs/soft_moe_toy.png and .json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modeling_moe import MoeConfig, MoeForCausalLM
from modeling_moe.cli import CliParser, UsageError, check_output_dir, run_cli
from modeling_moe.corpus import stdlib_paragraphs
from modeling_moe.hub import atomic_write_text
from modeling_moe.modeling_moe import SoftMoeBlock
from modeling_moe.soft_conversion import soft_to_topk
from training.tokenizer import train_byte_level_bpe
from training.upcycle_toy_experiment import eval_loss, token_blocks, train


@dataclass
class SoftToyArguments:
    """Sizes and schedule (defaults: about 35 minutes per seed single-threaded on the shared, loaded 2-core
    machine where the README's figures were made)."""

    corpus_chars: int = field(default=1_500_000, metadata={"help": "characters of stdlib docstrings"})
    vocab_size: int = 1024
    hidden_size: int = 128
    expert_intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 300
    lr: float = 2e-3
    num_experts: int = 4
    top_k: int = 2
    topk_aux_loss_coef: float = 0.01
    soft_slots_per_expert: int = 1
    soft_group_size: int = 2
    transition_steps: int = field(default=60, metadata={"help": "fine-tune steps after soft -> top-k"})
    transition_lr: float = 5e-4
    eval_every: int = 50
    eval_blocks: int = 64
    seeds: list[int] = field(default_factory=lambda: [0])
    threads: int = 2
    out_dir: str = "outputs"
    name: str = "soft_moe_toy"


def model_config(args: SoftToyArguments, vocab_size: int, router: str) -> MoeConfig:
    """The shared shape; `router` "topk" (topk_softmax, k, Switch aux loss) or "soft" (Mixture of Tokens)."""
    routing = (
        dict(router_type="topk_softmax", num_experts_per_tok=args.top_k, router_aux_loss_coef=args.topk_aux_loss_coef)
        if router == "topk"
        else dict(
            router_type="soft",
            num_experts_per_tok=args.top_k,  # the k of the later conversion
            router_aux_loss_coef=0.0,
            soft_slots_per_expert=args.soft_slots_per_expert,
            soft_group_size=args.soft_group_size,
        )
    )
    return MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.expert_intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        max_position_embeddings=args.seq_len,
        num_local_experts=args.num_experts,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        **routing,
    )


def soft_eval_loss(model, blocks, batch_size: int, group_size: int) -> float:
    """`eval_loss` with every soft layer's eval group size set to `group_size` (restored after)."""
    soft_blocks = [m for m in model.modules() if isinstance(m, SoftMoeBlock)]
    saved = [b.group_size_eval for b in soft_blocks]
    for b in soft_blocks:
        b.group_size_eval = group_size
    try:
        return eval_loss(model, blocks, batch_size)
    finally:
        for b, g in zip(soft_blocks, saved):
            b.group_size_eval = g


def run_seed(args: SoftToyArguments, seed: int, blocks, eval_blocks, vocab_size: int) -> dict:
    """Train top-k and Soft MoE with `seed` (same init seed for both, same batches); convert and fine-tune."""
    torch.manual_seed(seed)
    topk = MoeForCausalLM(model_config(args, vocab_size, "topk"))
    torch.manual_seed(seed)
    soft = MoeForCausalLM(model_config(args, vocab_size, "soft"))
    G = args.soft_group_size
    topk_curve = train(topk, blocks, eval_blocks, args, args.steps, args.lr, seed, f"top-{args.top_k} seed {seed}")
    g1_curve = []

    def evaluate_soft(model) -> float:  # the curve holds the training grouping; G = 1 goes to g1_curve
        g1_curve.append(soft_eval_loss(model, eval_blocks, args.batch_size, 1))
        return soft_eval_loss(model, eval_blocks, args.batch_size, G)

    soft_curve = train(soft, blocks, eval_blocks, args, args.steps, args.lr, seed, f"soft seed {seed}", evaluate_soft)
    converted = soft_to_topk(soft, top_k=args.top_k, router_aux_loss_coef=args.topk_aux_loss_coef)
    steps, lr, seed2 = args.transition_steps, args.transition_lr, seed + 1
    converted_curve = train(converted, blocks, eval_blocks, args, steps, lr, seed2, f"soft->top-{args.top_k}")
    topk_more = train(topk, blocks, eval_blocks, args, steps, lr, seed2, f"top-{args.top_k} continued")
    return {
        "seed": seed,
        "final_topk": topk_curve[-1][1],
        "final_soft_train_grouping": soft_curve[-1][1],
        "final_soft_g1": g1_curve[-1],
        "converted_before_tuning": converted_curve[0][1],
        "converted_after_tuning": converted_curve[-1][1],
        "topk_after_same_extra_steps": topk_more[-1][1],
        "curves": {
            "topk": topk_curve,
            "soft_train_grouping": soft_curve,
            "soft_g1": [(s, v) for (s, _), v in zip(soft_curve, g1_curve)],
            "converted": [(args.steps + s, v) for s, v in converted_curve],
            "topk_continued": [(args.steps + s, v) for s, v in topk_more],
        },
    }


def plot(results: list[dict], args: SoftToyArguments, path: Path) -> None:
    """Eval-loss curves of the first seed, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results[0]["curves"]
    k, G, E, n = args.top_k, args.soft_group_size, args.num_experts, args.soft_slots_per_expert
    labels = {
        "topk": f"top-{k} (aux loss {args.topk_aux_loss_coef})",
        "soft_train_grouping": f"Soft MoE, eval with training groups (G={G})",
        "soft_g1": "Soft MoE, eval with G=1 (generation)",
        "converted": f"Soft MoE -> top-{k}, fine-tuned",
        "topk_continued": f"top-{k}, continued",
    }
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label in labels.items():
        ax.plot([s for s, _ in curves[key]], [v for _, v in curves[key]], marker="o", ms=3, label=label)
    ax.axvline(args.steps, color="k", lw=0.6, ls=":")
    values = [v for c in curves.values() for _, v in c[1:]]
    ax.set_ylim(min(values) - 0.1, max(values) + 0.3)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy")
    ax.set_title(
        f"stdlib docstrings, {args.num_layers}x{args.hidden_size}, E={E}: top-{k} vs Soft MoE "
        f"({n} slot/expert, G={G}; {E * n / G:g} expert rows/token), seed {results[0]['seed']}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


PROG = "python -m training.soft_moe_toy_experiment"


def check_arguments(args: SoftToyArguments) -> None:
    """Refuse sizes and rates that cannot run, naming the argument and the allowed range."""
    for name, value in asdict(args).items():
        if isinstance(value, int) and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    for name in ("lr", "transition_lr"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name} must be > 0, got {getattr(args, name)}")
    if not args.topk_aux_loss_coef >= 0:
        raise UsageError(f"--topk_aux_loss_coef must be >= 0, got {args.topk_aux_loss_coef}")
    if not args.seeds:
        raise UsageError("--seeds needs at least one seed")
    if not args.name or "/" in args.name:
        raise UsageError(f"--name must be a file name without '/', got {args.name!r}")
    check_output_dir(args.out_dir, "--out_dir")


def main(argv: list[str] | None = None) -> dict:
    """Run every seed; write `{out_dir}/{name}.png` (first seed) and `.json`; return the summary."""
    (args,) = CliParser(SoftToyArguments, prog=PROG).parse(argv)
    check_arguments(args)
    soft_rows = args.num_experts * args.soft_slots_per_expert / args.soft_group_size
    if soft_rows != args.top_k:
        raise UsageError(
            f"equal active FLOPs needs num_experts * soft_slots_per_expert / soft_group_size == top_k, got "
            f"{args.num_experts} * {args.soft_slots_per_expert} / {args.soft_group_size} = {soft_rows:g} "
            f"!= {args.top_k}"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    texts = stdlib_paragraphs(max_chars=args.corpus_chars)
    n_eval = max(1, len(texts) // 20)
    train_texts, eval_texts = texts[n_eval:], texts[:n_eval]
    tokenizer = train_byte_level_bpe(train_texts, args.vocab_size)
    blocks = token_blocks(train_texts, tokenizer, args.seq_len)
    eval_blocks = token_blocks(eval_texts, tokenizer, args.seq_len)[: args.eval_blocks]
    results = [run_seed(args, seed, blocks, eval_blocks, len(tokenizer)) for seed in args.seeds]
    finals = [k for k in results[0] if k not in ("seed", "curves")]
    summary = {
        "args": asdict(args),
        "train_tokens": blocks.numel(),
        "expert_rows_per_token": {
            "topk": args.top_k,
            "soft_training": soft_rows,
            "soft_g1": args.num_experts * args.soft_slots_per_expert,
        },
        "mean_over_seeds": {k: sum(r[k] for r in results) / len(results) for k in finals},
        "seeds": results,
    }
    out = Path(args.out_dir)
    plot(results, args, out / f"{args.name}.png")
    atomic_write_text(out / f"{args.name}.json", json.dumps(summary, indent=2))
    print(json.dumps({"mean_over_seeds": summary["mean_over_seeds"]}))
    return summary


USER_ERRORS = ()

if __name__ == "__main__":
    run_cli(main, PROG, user_errors=USER_ERRORS)
