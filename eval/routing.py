"""Routing report pieces: what the routers of an MoE model do on evaluation text.

Every statistic comes from `modeling_moe.routing_stats` (the library's one routing-statistics module); this file
only runs the model, gathers its recorded routing (`output_router_logits=True`) and arranges the results:

* per MoE layer: load, CV and entropy of the load, dead experts, router entropy, confidence (top-1 probability
  and margin), dropped fraction (`RoutingAccumulator`);
* how often consecutive MoE layers pick the same experts (`consecutive_layer_agreement`);
* against a second model on the same tokens: per-layer top-k agreement and KL of the routing distributions
  (`topk_agreement`, `routing_kl`);
* a sweep of drops (and loss) against the capacity factor, for models with capacity (Switch style);
* "what experts learn" (ST-MoE, Sec. 7): per layer and expert, the tokens most often routed there, counted with
  `expert_counts`; and the first-choice expert of every token of a passage (Mixtral paper, Fig. 8).

Shape legend: N real tokens gathered over the evaluation chunks, E experts, K assignments per token (E for
expert choice), L MoE layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modeling_moe import routing_stats as rs

from .loading import EvalInputError
from .perplexity import Window, batched, token_losses

DEFAULT_CAPACITY_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass
class RoutingCapture:
    """The routing of one model over the evaluation chunks, real tokens only.

    logits[l]: (N, E) float32 raw router logits of MoE layer l. indices[l]: (N, K) experts each assignment ran on
    (sentinel E = dropped or unchosen). token_ids, doc_ids: (N,). summary: `RoutingAccumulator.summary()`, one
    dict per MoE layer. mean_nll: mean next-token NLL over the chunks' scored tokens (nats).
    """

    num_experts: int
    top_k: int
    router_type: str
    moe_layers: list[int]
    logits: list[torch.Tensor]
    indices: list[torch.Tensor]
    token_ids: torch.Tensor
    doc_ids: torch.Tensor
    summary: list[dict]
    mean_nll: float


def routing_config(model: PreTrainedModel) -> tuple[int, int, str, list[int]]:
    """(E, k, router_type, MoE layer indices) of an MoE model of this repository.

    Raises:
        EvalInputError: the model records no routing (not a `MoeForCausalLM`).
    """
    config = model.config
    if getattr(config, "model_type", None) != "moe_lm":
        raise EvalInputError(f"model: routing analysis needs an MoE model of this repository, got {config.model_type}")
    return config.num_local_experts, config.num_experts_per_tok, config.router_type, list(config.moe_layers)


def disjoint_chunks(docs: Sequence[Sequence[int]], max_length: int, max_tokens: int | None) -> list[Window]:
    """Non-overlapping windows of at most `max_length` tokens over the documents, each token in exactly one,
    stopping once `max_tokens` tokens are covered (None = all)."""
    windows: list[Window] = []
    covered = 0
    for d, ids in enumerate(docs):
        for begin in range(0, len(ids), max_length):
            end = min(begin + max_length, len(ids))
            if max_tokens is not None and covered >= max_tokens:
                return windows
            windows.append(Window(d, begin, end, begin + 1))
            covered += end - begin
    return windows


@torch.no_grad()
def collect_routing(
    model: PreTrainedModel,
    docs: Sequence[Sequence[int]],
    max_length: int,
    batch_size: int = 8,
    max_tokens: int | None = 16384,
    pad_id: int = 0,
    desc: str = "routing",
) -> RoutingCapture:
    """Run `model` over disjoint chunks of the documents with `output_router_logits=True` and gather its routing.

    Args:
        model: an MoE model of this repository in eval mode. docs: token ids per document.
        max_length: chunk length. batch_size: chunks per forward. max_tokens: stop after this many tokens.
        pad_id: padding id (padding is excluded from every statistic through the attention mask).
    Returns:
        A `RoutingCapture`.
    Raises:
        EvalInputError: not an MoE model, or no tokens.
    """
    E, k, router_type, moe_layers = routing_config(model)
    windows = disjoint_chunks(docs, max_length, max_tokens)
    if not windows:
        raise EvalInputError("dataset: no tokens to route")
    device = next(model.parameters()).device
    accumulator = rs.RoutingAccumulator(num_experts=E, top_k=k, expert_choice=router_type == "expert_choice")
    logits_parts: list[list[torch.Tensor]] = [[] for _ in moe_layers]
    index_parts: list[list[torch.Tensor]] = [[] for _ in moe_layers]
    token_parts, doc_parts = [], []
    nll_sum, nll_count = 0.0, 0
    for chunk, ids, mask in tqdm(
        batched(windows, docs, batch_size, pad_id), total=math.ceil(len(windows) / batch_size), desc=desc, leave=False
    ):
        ids, mask = ids.to(device), mask.to(device)
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        accumulator.update(out, mask)
        real_T = mask.reshape(-1).bool()
        for layer, (logits_TE, indices_TK) in enumerate(zip(out.router_logits, out.router_indices)):
            logits_parts[layer].append(logits_TE[real_T].float().cpu())
            index_parts[layer].append(indices_TK[real_T].cpu())
        token_parts.append(ids.reshape(-1)[real_T].cpu())
        doc_parts.append(torch.tensor([w.doc for w in chunk]).repeat_interleave(mask.sum(dim=1).cpu()))
        nll = token_losses(out.logits, ids)
        target_mask = mask[:, 1:].bool()
        nll_sum += float(nll[target_mask].double().sum())
        nll_count += int(target_mask.sum())
    return RoutingCapture(
        num_experts=E,
        top_k=k,
        router_type=router_type,
        moe_layers=moe_layers,
        logits=[torch.cat(p) for p in logits_parts],
        indices=[torch.cat(p) for p in index_parts],
        token_ids=torch.cat(token_parts),
        doc_ids=torch.cat(doc_parts),
        summary=accumulator.summary(),
        mean_nll=nll_sum / nll_count if nll_count else float("nan"),
    )


# --------------------------------------------------------------------------------------------- what experts learn
def token_expert_counts(indices_NK: torch.Tensor, token_ids_N: torch.Tensor, num_experts: int) -> tuple:
    """How often each distinct token id ran on each expert, counted by `routing_stats.expert_counts`.

    Each assignment (token, expert e) is mapped to the joint index rank(token) * E + e (sentinel assignments to
    the joint sentinel U * E), so `expert_counts` over U * E "experts" counts every (token, expert) pair with its
    own handling of drops.

    Returns:
        unique_ids (U,) int64, counts_UE (U, E) float64, occurrences_U (U,) float64 (tokens with that id).
    """
    unique_ids, inverse_N = torch.unique(token_ids_N, return_inverse=True)
    U = unique_ids.numel()
    joint_NK = torch.where(indices_NK < num_experts, inverse_N[:, None] * num_experts + indices_NK, U * num_experts)
    counts_UE = rs.expert_counts(joint_NK, U * num_experts).view(U, num_experts)
    occurrences_U = torch.bincount(inverse_N, minlength=U).double()
    return unique_ids, counts_UE, occurrences_U


def show_token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A token's text with whitespace made visible (space ␣, newline ↵, tab ⇥)."""
    text = tokenizer.decode([int(token_id)])
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or f"<{int(token_id)}>"


def top_tokens_table(
    capture: RoutingCapture, tokenizer: PreTrainedTokenizerBase, top_n: int = 8
) -> list[list[list[dict]]]:
    """Per MoE layer and expert: the `top_n` tokens most often routed there.

    Returns:
        table[l][e] = [{"token": text, "token_id": id, "count": assignments of that token on e,
        "share": count / occurrences of the token}, ...], most frequent first.
    """
    table = []
    for indices_NK in capture.indices:
        unique_ids, counts_UE, occurrences_U = token_expert_counts(indices_NK, capture.token_ids, capture.num_experts)
        per_expert = []
        for e in range(capture.num_experts):
            order = counts_UE[:, e].argsort(descending=True, stable=True)[:top_n]
            per_expert.append(
                [
                    {
                        "token": show_token(tokenizer, int(unique_ids[u])),
                        "token_id": int(unique_ids[u]),
                        "count": int(counts_UE[u, e]),
                        "share": float(counts_UE[u, e] / occurrences_U[u]),
                    }
                    for u in order.tolist()
                    if counts_UE[u, e] > 0
                ]
            )
        table.append(per_expert)
    return table


def first_choice_experts(capture: RoutingCapture) -> list[torch.Tensor]:
    """Per MoE layer, the (N,) first-choice expert of every token, -1 where that assignment was dropped.

    Token choice: the expert of the first assignment (`router_indices[:, 0]`, the router's highest-ranked pick
    after the capacity policy). Expert choice has no per-token ranking in its indices, so it is the expert with
    the highest router logit.
    """
    out = []
    for logits_NE, indices_NK in zip(capture.logits, capture.indices):
        if capture.router_type == "expert_choice":
            out.append(logits_NE.argmax(dim=-1))
        else:
            first = indices_NK[:, 0]
            out.append(torch.where(first < capture.num_experts, first, -1))
    return out


def passage(capture: RoutingCapture, tokenizer: PreTrainedTokenizerBase, max_tokens: int = 160) -> dict:
    """The first document's first `max_tokens` tokens (BOS left out) with each token's first-choice expert.

    Returns:
        {"tokens": [text per token], "first_choice": [[expert or -1 per token] per MoE layer]}.
    """
    where = torch.nonzero(capture.doc_ids == capture.doc_ids[0]).flatten()[1 : max_tokens + 1]
    choices = first_choice_experts(capture)
    return {
        "tokens": [tokenizer.decode([int(t)]) for t in capture.token_ids[where].tolist()],
        "first_choice": [c[where].tolist() for c in choices],
    }


# --------------------------------------------------------------------------------------------- report pieces
def routing_summary(capture: RoutingCapture, tokenizer: PreTrainedTokenizerBase, top_n: int = 8) -> dict:
    """Everything the report shows about one model's routing.

    Returns:
        {"num_experts", "top_k", "router_type", "moe_layers", "num_tokens", "layers": per MoE layer the
        `RoutingAccumulator` summary, "consecutive_layer_agreement": L - 1 values, "top_tokens", "passage"}.
    """
    return {
        "num_experts": capture.num_experts,
        "top_k": capture.top_k,
        "router_type": capture.router_type,
        "moe_layers": capture.moe_layers,
        "num_tokens": int(capture.token_ids.numel()),
        "layers": [{"layer": layer, **s} for layer, s in zip(capture.moe_layers, capture.summary)],
        "consecutive_layer_agreement": rs.consecutive_layer_agreement(capture.indices, capture.num_experts),
        "top_tokens": top_tokens_table(capture, tokenizer, top_n),
        "passage": passage(capture, tokenizer),
    }


def compare_routing(a: RoutingCapture, b: RoutingCapture) -> dict:
    """Per MoE layer: top-k agreement of a with b and KL(a || b) of their router distributions, same tokens.

    Raises:
        EvalInputError: the captures cover different tokens, or the models differ in MoE layers or experts.
    """
    if not torch.equal(a.token_ids, b.token_ids):
        raise EvalInputError("compare_model: routing was recorded on different tokens (different tokenizers)")
    if a.num_experts != b.num_experts or len(a.indices) != len(b.indices):
        raise EvalInputError(
            f"compare_model: routing comparison needs the same experts and MoE layers; got E={a.num_experts} "
            f"with {len(a.indices)} MoE layers vs E={b.num_experts} with {len(b.indices)}"
        )
    return {
        "layers": list(a.moe_layers),
        "topk_agreement": [rs.topk_agreement(ia, ib, a.num_experts) for ia, ib in zip(a.indices, b.indices)],
        "routing_kl": [rs.routing_kl(la, lb) for la, lb in zip(a.logits, b.logits)],
    }


def has_capacity(model: PreTrainedModel) -> bool:
    """True for models that can drop tokens in eval mode: Switch routing or a capacity factor in the config."""
    config = model.config
    return config.router_type == "switch" or config.capacity_factor_eval is not None


def moe_blocks(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The MoE FFN blocks (modules with a `capacity_factor_eval` attribute), in layer order."""
    return [m for m in model.modules() if hasattr(m, "capacity_factor_eval") and hasattr(m, "router")]


def capacity_sweep(
    model: PreTrainedModel,
    docs: Sequence[Sequence[int]],
    max_length: int,
    factors: Sequence[float] = DEFAULT_CAPACITY_FACTORS,
    batch_size: int = 8,
    max_tokens: int | None = 4096,
    pad_id: int = 0,
) -> dict:
    """Dropped fraction per MoE layer and mean NLL for each eval capacity factor (the model is restored after).

    Returns:
        {"factors": [...], "dropped_fraction": [[per MoE layer] per factor], "mean_nll": [per factor]}.
    Raises:
        EvalInputError: a factor is not > 0.
    """
    bad = [f for f in factors if not f > 0]
    if bad:
        raise EvalInputError(f"capacity_factors must all be > 0, got {bad}")
    blocks = moe_blocks(model)
    saved = [b.capacity_factor_eval for b in blocks]
    dropped, nll = [], []
    try:
        for factor in factors:
            for b in blocks:
                b.capacity_factor_eval = float(factor)
            cap = collect_routing(model, docs, max_length, batch_size, max_tokens, pad_id, desc=f"capacity {factor}")
            dropped.append([s["dropped_fraction"] for s in cap.summary])
            nll.append(cap.mean_nll)
    finally:
        for b, value in zip(blocks, saved):
            b.capacity_factor_eval = value
    return {"factors": [float(f) for f in factors], "dropped_fraction": dropped, "mean_nll": nll}


__all__ = [
    "DEFAULT_CAPACITY_FACTORS",
    "RoutingCapture",
    "capacity_sweep",
    "collect_routing",
    "compare_routing",
    "disjoint_chunks",
    "first_choice_experts",
    "has_capacity",
    "moe_blocks",
    "passage",
    "routing_config",
    "routing_summary",
    "show_token",
    "token_expert_counts",
    "top_tokens_table",
]
