"""Routing statistics: the one place where load, CV, entropy, drops, dead experts, confidence, agreement and KL
are computed. The router monitor (training), the evaluation harness and the `evaluate` modules all call these.

Shape legend: T tokens of one layer (batch * sequence, flattened), E experts, K assignments per token (E for
expert choice). `indices_TK` hold the expert each assignment ran on, with the sentinel E for a dropped or
unchosen assignment (`MoeCausalLMOutput.router_indices`). `token_mask_T` is bool, False for padding.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def _flat_mask(token_mask, num_tokens: int, device) -> torch.Tensor | None:
    if token_mask is None:
        return None
    mask_T = token_mask.reshape(-1).to(device=device, dtype=torch.bool)
    if mask_T.numel() != num_tokens:
        raise ValueError(f"token mask has {mask_T.numel()} entries for {num_tokens} routed tokens")
    return mask_T


def expert_counts(indices_TK: torch.Tensor, num_experts: int, token_mask=None) -> torch.Tensor:
    """Assignments that ran on each expert (dropped ones excluded), real tokens only.

    Returns:
        counts_E: float64 tensor of shape (E,).
    """
    mask_T = _flat_mask(token_mask, indices_TK.shape[0], indices_TK.device)
    kept = indices_TK if mask_T is None else indices_TK[mask_T]
    return torch.bincount(kept.reshape(-1), minlength=num_experts + 1)[:num_experts].double()


def load_fractions(counts_E: torch.Tensor) -> torch.Tensor:
    """counts / total (all zeros when nothing was routed). Returns (E,) float64."""
    total = counts_E.sum()
    return counts_E / total if total > 0 else torch.zeros_like(counts_E, dtype=torch.float64)


def load_cv(counts_E: torch.Tensor) -> float:
    """Coefficient of variation of the load: population std / mean over experts (0 = perfectly balanced)."""
    counts = counts_E.double()
    mean = counts.mean()
    return float(counts.std(correction=0) / mean) if mean > 0 else 0.0


def load_entropy(counts_E: torch.Tensor) -> float:
    """Entropy (nats) of the load distribution; log(E) when balanced, 0 when one expert takes everything."""
    p = load_fractions(counts_E)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def dead_experts(counts_E: torch.Tensor) -> list[int]:
    """Experts that received no token."""
    return [int(i) for i in torch.nonzero(counts_E == 0).flatten()]


def router_entropy(router_logits_TE: torch.Tensor, token_mask=None) -> float:
    """Mean over real tokens of the entropy (nats) of the softmax router distribution."""
    logp = F.log_softmax(router_logits_TE.double(), dim=-1)
    h_T = -(logp.exp() * logp).sum(dim=-1)
    mask_T = _flat_mask(token_mask, h_T.shape[0], h_T.device)
    h_T = h_T if mask_T is None else h_T[mask_T]
    return float(h_T.mean()) if h_T.numel() else 0.0


def expert_mass(router_logits_TE: torch.Tensor, token_mask=None) -> torch.Tensor:
    """Sum over real tokens of the softmax router distribution: each expert's probability mass (E,) float64.

    For Soft MoE (router_type="soft") the recorded logits are per-expert logsumexps of the slot logits, so this is
    the combine weight each expert's slots receive, and `router_entropy` is the entropy of the per-expert
    combine weights (of the slot combine weights themselves when there is one slot per expert).
    """
    probs_TE = F.softmax(router_logits_TE.double(), dim=-1)
    mask_T = _flat_mask(token_mask, probs_TE.shape[0], probs_TE.device)
    return (probs_TE if mask_T is None else probs_TE[mask_T]).sum(dim=0)


def router_confidence(router_logits_TE: torch.Tensor, token_mask=None) -> dict[str, float]:
    """Mean top-1 softmax probability and mean margin (top-1 minus top-2 probability) over real tokens."""
    probs_TE = F.softmax(router_logits_TE.double(), dim=-1)
    top = probs_TE.topk(min(2, probs_TE.shape[-1]), dim=-1).values
    margin_T = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]
    mask_T = _flat_mask(token_mask, probs_TE.shape[0], probs_TE.device)
    if mask_T is not None:
        top, margin_T = top[mask_T], margin_T[mask_T]
    if not top.numel():
        return {"top1_prob": 0.0, "margin": 0.0}
    return {"top1_prob": float(top[:, 0].mean()), "margin": float(margin_T.mean())}


def dropped_fraction(dropped: int | torch.Tensor, num_real_tokens: int, k: int) -> float:
    """Dropped assignments over the assignments the router made (real tokens * k). For expert choice the model
    reports the real tokens no expert took, so pass k = 1: the fraction of tokens that skipped the layer."""
    total = num_real_tokens * k
    return float(dropped) / total if total else 0.0


def topk_agreement(indices_a_TK: torch.Tensor, indices_b_TK: torch.Tensor, num_experts: int, token_mask=None) -> float:
    """Mean over real tokens of |A ∩ B| / |A|, where A, B are the experts (sentinels ignored) two routings picked.

    Tokens with no expert in A are skipped. For top-1 routing this is the fraction of tokens sent to the same
    expert. Used for routing drift (base vs fine-tuned) and for consecutive-layer agreement.
    """
    if indices_a_TK.shape[0] != indices_b_TK.shape[0]:
        raise ValueError(f"routings cover {indices_a_TK.shape[0]} and {indices_b_TK.shape[0]} tokens")
    one_hot_a = F.one_hot(indices_a_TK, num_experts + 1)[..., :num_experts].sum(dim=1).clamp(max=1)
    one_hot_b = F.one_hot(indices_b_TK, num_experts + 1)[..., :num_experts].sum(dim=1).clamp(max=1)
    size_a = one_hot_a.sum(dim=-1).double()
    overlap = (one_hot_a * one_hot_b).sum(dim=-1).double()
    valid = size_a > 0
    mask_T = _flat_mask(token_mask, indices_a_TK.shape[0], indices_a_TK.device)
    if mask_T is not None:
        valid = valid & mask_T
    return float((overlap[valid] / size_a[valid]).mean()) if valid.any() else 0.0


def routing_kl(router_logits_p_TE: torch.Tensor, router_logits_q_TE: torch.Tensor, token_mask=None) -> float:
    """Mean over real tokens of KL(p || q) (nats) between two softmax router distributions on the same tokens."""
    logp = F.log_softmax(router_logits_p_TE.double(), dim=-1)
    logq = F.log_softmax(router_logits_q_TE.double(), dim=-1)
    kl_T = (logp.exp() * (logp - logq)).sum(dim=-1)
    mask_T = _flat_mask(token_mask, kl_T.shape[0], kl_T.device)
    kl_T = kl_T if mask_T is None else kl_T[mask_T]
    return float(kl_T.mean()) if kl_T.numel() else 0.0


@dataclass
class RoutingAccumulator:
    """Sums routing statistics over many forward passes (a logging window, an evaluation set).

    `update(outputs, attention_mask)` takes a model output computed with `output_router_logits=True`.
    `summary()` returns one dict per MoE layer. Entropy and confidence are token means over the window.
    """

    num_experts: int
    top_k: int
    expert_choice: bool = False  # drops are then tokens no expert took, over real tokens (not assignments)
    counts: list[torch.Tensor] = field(default_factory=list)
    dropped: list[float] = field(default_factory=list)
    entropy_sum: list[float] = field(default_factory=list)
    top1_sum: list[float] = field(default_factory=list)
    margin_sum: list[float] = field(default_factory=list)
    mass: list[torch.Tensor] = field(default_factory=list)
    real_tokens: int = 0

    @classmethod
    def for_config(cls, config) -> RoutingAccumulator:
        """An accumulator for a model config: its experts, its k, and its router's meaning of a drop."""
        return cls(
            config.num_local_experts,
            config.num_experts_per_tok,
            expert_choice=getattr(config, "router_type", None) == "expert_choice",
        )

    def update(self, outputs, attention_mask: torch.Tensor | None = None) -> None:
        """Add one forward pass. `outputs` needs `router_logits` and `router_indices` (and `dropped_tokens`)."""
        if outputs.router_logits is None or outputs.router_indices is None:
            raise ValueError("RoutingAccumulator needs a model output computed with output_router_logits=True")
        mask = None
        if attention_mask is not None:
            logits = getattr(outputs, "logits", None)  # base-model outputs have none
            seq = logits.shape[1] if logits is not None else attention_mask.shape[1]
            mask = attention_mask[:, -seq:].bool()
        n_real = int(mask.sum()) if mask is not None else int(outputs.router_logits[0].shape[0])
        if not self.counts:
            layers = len(outputs.router_indices)
            self.counts = [torch.zeros(self.num_experts, dtype=torch.float64) for _ in range(layers)]
            self.dropped = [0.0] * layers
            self.entropy_sum, self.top1_sum, self.margin_sum = [0.0] * layers, [0.0] * layers, [0.0] * layers
            self.mass = [torch.zeros(self.num_experts, dtype=torch.float64) for _ in range(layers)]
        for layer, (logits_TE, indices_TK) in enumerate(zip(outputs.router_logits, outputs.router_indices)):
            self.counts[layer] += expert_counts(indices_TK.detach(), self.num_experts, mask).cpu()
            self.entropy_sum[layer] += router_entropy(logits_TE.detach(), mask) * n_real
            self.mass[layer] += expert_mass(logits_TE.detach(), mask).cpu()
            conf = router_confidence(logits_TE.detach(), mask)
            self.top1_sum[layer] += conf["top1_prob"] * n_real
            self.margin_sum[layer] += conf["margin"] * n_real
            if outputs.dropped_tokens is not None:
                self.dropped[layer] += float(outputs.dropped_tokens[layer])
        self.real_tokens += n_real

    def summary(self) -> list[dict]:
        """Per MoE layer: load fractions, CV, load entropy, router entropy, confidence, drops, dead experts, and
        "expert_mass": each expert's mean router probability (Soft MoE: its mean combine weight)."""
        out = []
        n = max(self.real_tokens, 1)
        for layer, counts_E in enumerate(self.counts):
            out.append(
                {
                    "load": load_fractions(counts_E).tolist(),
                    "load_cv": load_cv(counts_E),
                    "load_entropy": load_entropy(counts_E),
                    "router_entropy": self.entropy_sum[layer] / n,
                    "top1_prob": self.top1_sum[layer] / n,
                    "margin": self.margin_sum[layer] / n,
                    "dropped_fraction": dropped_fraction(
                        self.dropped[layer], self.real_tokens, 1 if self.expert_choice else self.top_k
                    ),
                    "dead_experts": dead_experts(counts_E),
                    "expert_mass": (self.mass[layer] / n).tolist(),
                }
            )
        return out

    def reset(self) -> None:
        """Start a new window."""
        self.counts, self.dropped, self.entropy_sum, self.top1_sum, self.margin_sum = [], [], [], [], []
        self.mass = []
        self.real_tokens = 0


def consecutive_layer_agreement(
    router_indices: Sequence[torch.Tensor], num_experts: int, token_mask=None
) -> list[float]:
    """`topk_agreement` between each MoE layer and the next (how often consecutive layers pick the same experts)."""
    return [topk_agreement(a, b, num_experts, token_mask) for a, b in itertools.pairwise(router_indices)]


__all__ = [
    "RoutingAccumulator",
    "consecutive_layer_agreement",
    "dead_experts",
    "dropped_fraction",
    "expert_counts",
    "expert_mass",
    "load_cv",
    "load_entropy",
    "load_fractions",
    "router_confidence",
    "router_entropy",
    "routing_kl",
    "topk_agreement",
]
