"""Routers and dispatch: hidden states -> router logits -> (weights, expert indices) -> capacity policy.

Shape legend used in every name and comment of this file:
    T tokens (batch * sequence, flattened), D hidden size, E experts, K experts per token (token choice),
    G expert groups; for soft routing: B batch, S sequence, N token groups, M tokens per group (the config's
    soft group size), P slots (E * slots per expert).

A dropped or unchosen assignment carries the sentinel expert index E; the experts skip it and its weight is 0.
Selection and weighting are separate: `scores_TE` are what the weights are taken from, `choice_TE` what the
top-k is taken over (scores plus the aux-loss-free bias, with masked groups at -inf). Softmax and sigmoid are
taken in float32 whatever the activation dtype.

Router types (config.router_type):
    topk_softmax     Mixtral: softmax over E, top k, renormalise (norm_topk_prob).
    switch           Switch Transformer: top 1, weight = router probability (Fedus et al. 2021, Eq. 1-2).
    noisy_topk       Shazeer et al. 2017: H = xW_g + N(0, 1) * softplus(xW_noise) in training (Eq. 4),
                     KeepTopK sets the rest to -inf, softmax over the kept k (Eq. 3, 5).
    sigmoid_grouped  DeepSeek-V3: sigmoid scores, the top `topk_group` of `n_group` groups (by the sum of each
                     group's top-2 scores), then the top k experts inside them; weights renormalised and scaled
                     by `routed_scaling_factor`.
    expert_choice    Zhou et al. 2022: each expert takes its top-C tokens of the batch by softmax score (Eq. 1-2).
                     A token sees other positions of the batch, so this is not causal: use it for training and
                     full-sequence evaluation. In `generate()` it falls back to token-choice top-k over the same
                     softmax scores, weights not renormalised.
    soft             Soft MoE (Puigcerver et al. 2023) in the causal Mixture-of-Tokens form (Antoniak et al. 2023):
                     slot logits L = x Phi^T over P = E * slots_per_expert slots; within a group of tokens (G
                     sequences of the batch at one position), dispatch D = softmax of L over the group's tokens
                     (Eq. 1), slot input = sum_t D[t, p] x_t, combine C = softmax of L over slots (Eq. 2), output
                     y_t = sum_p C[t, p] expert_p(slot input p). No token is dropped; nothing crosses positions.
                     G = 1 (generation, eval by default) gives D = 1: the dense soft mixture of all experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TOKEN_CHOICE_ROUTERS = ("topk_softmax", "switch", "noisy_topk", "sigmoid_grouped")
ROUTER_TYPES = (*TOKEN_CHOICE_ROUTERS, "expert_choice", "soft")
CAPACITY_POLICIES = ("drop", "priority", "next_choice")


# ----------------------------------------------------------------------------------------------- token choice
def topk_softmax_routing(
    logits_TE: torch.Tensor, k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over all E experts, keep the k largest, optionally renormalise them to sum to 1.

    Args:
        logits_TE: router logits, shape (T, E), any float dtype.
        k: experts per token, 1 <= k <= E.
        renormalize: divide the kept probabilities by their sum (Mixtral; `norm_topk_prob`).
    Returns:
        weights_TK: float32 routing weights, shape (T, K).
        indices_TK: int64 expert indices, shape (T, K), in decreasing order of probability.
    """
    probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
    weights_TK, indices_TK = torch.topk(probs_TE, k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, indices_TK


def switch_routing(logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformer routing: each token goes to its argmax expert, scaled by that expert's probability.

    The output of expert i for token x is multiplied by p_i(x) = softmax(W_r x)_i (Fedus et al. 2021, Eq. 1-2),
    which is how the router receives a gradient even though only one expert runs.

    Args:
        logits_TE: router logits, shape (T, E).
    Returns:
        weights_TK: float32 router probability of the chosen expert, shape (T, 1).
        indices_TK: int64 chosen expert, shape (T, 1).
    """
    return topk_softmax_routing(logits_TE, 1, renormalize=False)


def keep_topk_softmax(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shazeer et al. 2017 gating: G(x) = Softmax(KeepTopK(H(x), k)) (Eq. 3), where KeepTopK sets every
    logit outside the top k to -inf (Eq. 5). Equal to renormalised top-k softmax; kept for the paper's form.

    Returns:
        weights_TK (float32, (T, K)) and indices_TK ((T, K)).
    """
    top_logits_TK, indices_TK = torch.topk(logits_TE.float(), k, dim=-1)
    kept_TE = torch.full_like(logits_TE, float("-inf"), dtype=torch.float32).scatter(1, indices_TK, top_logits_TK)
    weights_TK = F.softmax(kept_TE, dim=-1).gather(1, indices_TK)  # Eq. 3
    return weights_TK, indices_TK


def group_limited_choice(scores_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3 group-limited routing: keep the `topk_group` best of `n_group` groups, -inf elsewhere.

    A group's score is the sum of its two best expert scores (its best one when a group has a single expert).

    Args:
        scores_TE: selection scores (sigmoid scores plus bias), shape (T, E), E divisible by n_group.
    Returns:
        choice_TE: the scores with experts of unselected groups set to -inf, shape (T, E).
    """
    if n_group == 1:
        return scores_TE
    T, E = scores_TE.shape
    grouped_TGe = scores_TE.view(T, n_group, E // n_group)
    group_scores_TG = grouped_TGe.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)
    group_idx = group_scores_TG.topk(topk_group, dim=-1).indices
    group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter(1, group_idx, True)
    return grouped_TGe.masked_fill(~group_mask_TG[..., None], float("-inf")).view(T, E)


def expert_choice_routing(
    scores_TE: torch.Tensor, capacity: int, token_mask_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert choice (Zhou et al. 2022): each expert takes its `capacity` highest-scoring tokens (Eq. 1-2).

    Args:
        scores_TE: softmax scores, shape (T, E).
        capacity: tokens per expert, C (clamped to the number of real tokens).
        token_mask_T: bool, False for padding, which no expert picks.
    Returns:
        weights_TE: scores_TE where expert e took token t, else 0; shape (T, E), float32.
        indices_TE: e where expert e took token t, else the sentinel E; shape (T, E).
    """
    T, E = scores_TE.shape
    selectable_TE = scores_TE if token_mask_T is None else scores_TE.masked_fill(~token_mask_T[:, None], -1.0)
    real = T if token_mask_T is None else int(token_mask_T.sum())
    C = min(capacity, real)
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=scores_TE.device)
    if C > 0:
        top_tokens_CE = selectable_TE.topk(C, dim=0).indices  # Eq. 1: I = TopK(S^T, C)
        chosen_TE.scatter_(0, top_tokens_CE, True)
    experts_TE = torch.arange(E, device=scores_TE.device).expand(T, E)
    indices_TE = torch.where(chosen_TE, experts_TE, E)
    weights_TE = torch.where(chosen_TE, scores_TE.float(), 0.0)  # Eq. 2: gate value G = S gathered at I
    return weights_TE, indices_TE


# ----------------------------------------------------------------------------------------------- capacity
def expert_capacity(num_tokens: int, k: int, capacity_factor: float, num_experts: int) -> int:
    """Slots per expert in one forward pass: ceil(tokens * k * capacity_factor / E) (Switch, Eq. 3; GShard).

    Args:
        num_tokens: T, the tokens that are routed in this forward pass (padding excluded when a mask is known).
        k: experts per token. capacity_factor: > 0. num_experts: E.
    Returns:
        The capacity, an int >= 1 whenever num_tokens >= 1.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return math.ceil(num_tokens * k * capacity_factor / num_experts)


def capacity_keep_mask(indices_TK: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """Which assignments fit within each expert's capacity, filled in GShard's arrival order.

    Slots go by token position, and every token's first choice is placed before any token's second choice
    (Lepikhin et al. 2020, Algorithm 1). An assignment that finds its expert full is dropped. Assignments that
    already hold the sentinel E take no slot.

    Args:
        indices_TK: expert index per assignment, shape (T, K).
        capacity: slots per expert (see `expert_capacity`).
        num_experts: E.
    Returns:
        keep_TK: bool, shape (T, K); False where the assignment overflowed (or was already the sentinel).
    """
    T, K = indices_TK.shape
    choice_major_N = indices_TK.t().reshape(-1)  # (K*T,): all first choices, then all second choices
    one_hot_NE = F.one_hot(choice_major_N, num_experts + 1)[:, :num_experts].to(torch.int32)
    position_N = (one_hot_NE.cumsum(dim=0) * one_hot_NE).sum(dim=-1) - 1  # slot this assignment would take
    keep_N = (position_N < capacity) & (choice_major_N < num_experts)
    return keep_N.view(K, T).t()


def priority_keep_mask(
    indices_TK: torch.Tensor, weights_TK: torch.Tensor, capacity: int, num_experts: int
) -> torch.Tensor:
    """Batch priority routing (Riquelme et al. 2021, V-MoE Sec. 3.1 / Algorithm 2): tokens are served in
    decreasing order of their top routing weight, first choices before second choices; the rest are dropped.

    Returns:
        keep_TK: bool, shape (T, K).
    """
    priority_T = weights_TK.max(dim=-1).values.masked_fill(indices_TK[:, 0] == num_experts, float("-inf"))
    order_T = torch.argsort(priority_T, descending=True, stable=True)
    keep_sorted_TK = capacity_keep_mask(indices_TK[order_T], capacity, num_experts)
    return torch.empty_like(keep_sorted_TK).index_copy_(0, order_T, keep_sorted_TK)


def next_choice_reroute(
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    choice_TE: torch.Tensor,
    scores_TE: torch.Tensor,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send each assignment turned away by a full expert to the token's next-best expert that still has room.

    Experts are tried in the token's order of preference (`choice_TE`, best first) after its k original choices,
    one round per rank; within a round, tokens are served in position order. An assignment is dropped only when
    no expert has room. The new weight keeps the token's original scale: w_new = scores[new] * w_old / scores[old]
    (for renormalised top-k that is the new probability over the original top-k sum).

    Args:
        indices_TK, weights_TK: the original assignments, shape (T, K). keep_TK: which of them fit (T, K).
        choice_TE: selection scores (T, E), -inf for experts a token may not use. scores_TE: weight scores (T, E).
        capacity: slots per expert.
    Returns:
        indices_TK (sentinel E where finally dropped) and weights_TK (0 there).
    """
    K = indices_TK.shape[1]
    E = choice_TE.shape[1]
    sentinel = torch.full_like(indices_TK, E)
    old_indices_TK = indices_TK
    indices_TK = torch.where(keep_TK, indices_TK, sentinel)
    load_E = torch.bincount(indices_TK.reshape(-1), minlength=E + 1)[:E]
    scale_TK = weights_TK / scores_TE.gather(1, old_indices_TK.clamp(max=E - 1)).clamp_min(1e-20)
    weights_TK = torch.where(keep_TK, weights_TK, 0.0)
    # a dropped assignment is pending only if the router had chosen a real expert
    pending_TK = ~keep_TK & (old_indices_TK < E)
    preference_TE = torch.argsort(choice_TE, dim=-1, descending=True, stable=True)
    rank_allowed_TE = torch.isfinite(choice_TE.gather(1, preference_TE))
    for rank in range(K, E):
        want_T = pending_TK.any(dim=-1) & rank_allowed_TE[:, rank]
        if not bool(want_T.any()):
            if not bool(pending_TK.any()):
                break
            continue
        cand_T = preference_TE[:, rank]
        one_hot_TE = F.one_hot(cand_T, E).to(torch.int32) * want_T[:, None]
        position_T = (one_hot_TE.cumsum(dim=0) * one_hot_TE).sum(dim=-1) - 1 + load_E[cand_T]
        accept_T = want_T & (position_T < capacity)
        if not bool(accept_T.any()):
            continue
        load_E = load_E + torch.bincount(cand_T[accept_T], minlength=E)
        slot_T = pending_TK.float().argmax(dim=-1)  # the token's first pending assignment
        rows = accept_T.nonzero().squeeze(-1)
        slots = slot_T[rows]
        new_e = cand_T[rows]
        indices_TK = indices_TK.index_put((rows, slots), new_e)
        weights_TK = weights_TK.index_put((rows, slots), scores_TE[rows, new_e] * scale_TK[rows, slots])
        pending_TK = pending_TK.index_put((rows, slots), torch.zeros_like(rows, dtype=torch.bool))
    return indices_TK, weights_TK


def apply_capacity(
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    choice_TE: torch.Tensor,
    scores_TE: torch.Tensor,
    capacity: int,
    policy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply an overflow policy ("drop", "priority" or "next_choice") to token-choice assignments.

    Returns:
        indices_TK with the sentinel E where an assignment was dropped, and weights_TK with 0 there.
    """
    E = choice_TE.shape[1]
    if policy == "drop":
        keep_TK = capacity_keep_mask(indices_TK, capacity, E)
    elif policy == "priority":
        keep_TK = priority_keep_mask(indices_TK, weights_TK, capacity, E)
    elif policy == "next_choice":
        keep_TK = capacity_keep_mask(indices_TK, capacity, E)
        return next_choice_reroute(indices_TK, weights_TK, keep_TK, choice_TE, scores_TE, capacity)
    else:
        raise ValueError(f"capacity_policy must be one of {CAPACITY_POLICIES}, got {policy!r}")
    return indices_TK.masked_fill(~keep_TK, E), weights_TK.masked_fill(~keep_TK, 0.0)


# ----------------------------------------------------------------------------------------------- modules
class MoeRouter(nn.Module):
    """Linear router: hidden states -> raw logits -> (weights, indices) under `config.router_type`.

    `forward` returns `(router_logits_TE, weights_TK, indices_TK, choice_TE, scores_TE)`, raw logits first so
    that transformers' output recorder collects them (`output_router_logits=True`). The raw logits are x W^T,
    before noise (noisy_topk), jitter and bias.

    Buffers:
        e_score_correction_bias (E,): aux-loss-free balancing bias (DeepSeek-V3), added to the scores for
            selection only. Saved with the model; changed only by `update_bias()`.
        load_counts (E,): tokens routed to each expert in training forwards since the last bias update (not
            saved). Filled by the model from the recorded routing, once per forward, never in recomputation.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.router_type = config.router_type
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.norm_topk_prob = config.resolved_norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.bias_update_rate = config.router_bias_update_rate
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))  # (E, D)
        if self.router_type == "noisy_topk":
            self.noise_weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))  # W_noise
        if self.bias_update_rate > 0:  # aux-loss-free balancing is on
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_local_experts), persistent=True)
            self.register_buffer("load_counts", torch.zeros(config.num_local_experts), persistent=False)
        else:
            self.e_score_correction_bias = None
            self.load_counts = None

    def forward(
        self,
        x_TD: torch.Tensor,
        capacity: int | None = None,
        token_mask_T: torch.Tensor | None = None,
        token_choice_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route T tokens.

        Args:
            x_TD: router input, shape (T, D).
            capacity: tokens per expert for expert choice (ignored by token-choice routers).
            token_mask_T: bool (T,), False for padding (only expert choice uses it here).
            token_choice_only: use the token-choice fallback of expert choice (generation).
        Returns:
            router_logits_TE (T, E), input dtype; weights_TK and indices_TK ((T, E) for expert choice);
            choice_TE (T, E) selection scores; scores_TE (T, E) float32 weight scores.
        """
        if self.training and self.jitter_noise > 0:
            # Multiplicative jitter on the router input only (Switch Transformer, Sec. 2.4 / Appendix A).
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        router_logits_TE = F.linear(x_TD, self.weight)
        logits_TE = router_logits_TE.float()
        k = self.top_k

        if self.router_type == "sigmoid_grouped":
            scores_TE = torch.sigmoid(logits_TE)
        elif self.router_type == "noisy_topk":
            if self.training:
                noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight).float())
                logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE  # Shazeer et al. 2017, Eq. 4
            scores_TE = F.softmax(logits_TE, dim=-1)
        else:
            scores_TE = F.softmax(logits_TE, dim=-1)

        if self.router_type == "expert_choice" and not token_choice_only:
            weights_TE, indices_TE = expert_choice_routing(scores_TE, capacity, token_mask_T)
            return router_logits_TE, weights_TE, indices_TE, scores_TE, scores_TE

        choice_TE = scores_TE
        if self.e_score_correction_bias is not None:
            choice_TE = scores_TE + self.e_score_correction_bias  # selection only (DeepSeek-V3, Eq. 16)
        if self.router_type == "sigmoid_grouped":
            choice_TE = group_limited_choice(choice_TE, self.n_group, self.topk_group)
        if self.router_type == "noisy_topk":
            bias = self.e_score_correction_bias if self.e_score_correction_bias is not None else 0.0
            weights_TK, indices_TK = keep_topk_softmax(logits_TE + bias, k)
        else:
            top_TK = torch.topk(choice_TE, k, dim=-1)
            indices_TK = top_TK.indices
            # the chosen scores: topk's values unless a bias moved the choice (then gathered)
            weights_TK = top_TK.values if choice_TE is scores_TE else scores_TE.gather(1, indices_TK)
            if self.norm_topk_prob:
                weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * self.routed_scaling_factor
        return router_logits_TE, weights_TK, indices_TK, choice_TE, scores_TE

    @torch.no_grad()
    def update_bias(self) -> None:
        """One aux-loss-free balancing step (Wang et al. 2024; DeepSeek-V3 Sec. 2.1.2): b_i += u * sign(mean
        load - load_i) over the tokens counted since the last call, then reset the counts. Under
        torch.distributed the counts are summed over processes first, so every rank takes the same step."""
        if self.e_score_correction_bias is None:
            return
        counts_E = self.load_counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_E)
        if counts_E.sum() > 0:
            self.e_score_correction_bias += self.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        self.load_counts.zero_()


# ----------------------------------------------------------------------------------------------- soft routing
def to_position_groups(x_BS: torch.Tensor, group_size: int, fill: float | bool = 0) -> torch.Tensor:
    """Group batch rows at each position (Mixture of Tokens): rows [0, M), [M, 2M), ... form the groups.

    Args:
        x_BS: shape (B, S, *rest). group_size: M >= 1.
        fill: value of the rows added when B is not a multiple of M (the last group's missing members; give them
            a False token mask so that they take no share of a slot).
    Returns:
        x_NM: shape (N, M, *rest) with N = ceil(B / M) * S; group n holds position n % S of batch rows
        M * (n // S) ... M * (n // S) + M - 1.
    """
    B, S, *rest = x_BS.shape
    R = -(-B // group_size)  # groups per position
    if R * group_size != B:
        pad = x_BS.new_full((R * group_size - B, S, *rest), fill)
        x_BS = torch.cat([x_BS, pad])
    return x_BS.view(R, group_size, S, *rest).transpose(1, 2).reshape(R * S, group_size, *rest)


def from_position_groups(x_NM: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """Inverse of `to_position_groups`: (N, M, *rest) -> (B, S, *rest), the fill rows removed."""
    N, M, *rest = x_NM.shape
    R = N // seq_len
    return x_NM.view(R, seq_len, M, *rest).transpose(1, 2).reshape(R * M, seq_len, *rest)[:batch_size]


def soft_dispatch_weights(logits_NMP: torch.Tensor, token_mask_NM: torch.Tensor) -> torch.Tensor:
    """Soft MoE dispatch weights: for each slot, a softmax over the tokens of its group (Puigcerver et al. 2023,
    Eq. 1), padding excluded.

    A masked token's weight is exactly 0; a slot whose group has no real token gets all-zero weights (its input
    is the zero vector) instead of a 0/0.

    Args:
        logits_NMP: slot logits x Phi^T, shape (N, M, P). token_mask_NM: bool, False for padding and fill rows.
    Returns:
        dispatch_NMP: float32, each (n, :, p) column sums to 1 over the real tokens of group n (or is all 0).
    """
    logits_NMP = logits_NMP.float().masked_fill(~token_mask_NM[..., None], float("-inf"))
    max_N1P = logits_NMP.amax(dim=1, keepdim=True).detach()
    max_N1P = torch.where(torch.isfinite(max_N1P), max_N1P, 0.0)
    exp_NMP = torch.exp(logits_NMP - max_N1P)  # exp(-inf) = 0 for padding
    return exp_NMP / exp_NMP.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def soft_combine_weights(logits_NMP: torch.Tensor) -> torch.Tensor:
    """Soft MoE combine weights: for each token, a softmax over all P slots (Puigcerver et al. 2023, Eq. 2).

    Returns:
        combine_NMP: float32, shape (N, M, P), rows sum to 1.
    """
    return F.softmax(logits_NMP, dim=-1, dtype=torch.float32)


class SoftMoeRouter(nn.Module):
    """Soft MoE router: Phi, one D-vector per slot; slot p belongs to expert p // slots_per_expert.

    `forward(x_TD)` returns `(router_logits_TE, slot_logits_TP)`. `router_logits_TE` (float32) is, per expert,
    the logsumexp of its slots' logits, so its softmax over E is exactly the token's combine mass per expert
    (the share of its output that comes from each expert); it is what the model records as `router_logits`
    (statistics, z-loss). `slot_logits_TP` (input dtype) are x Phi^T, grouped and normalised by the block.
    Named `router` in the block, so router-stable LoRA and the parameter accounting treat Phi as the router.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.slots_per_expert = config.soft_slots_per_expert
        self.weight = nn.Parameter(torch.empty(self.num_experts * self.slots_per_expert, config.hidden_size))  # Phi

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slot_logits_TP = F.linear(x_TD, self.weight)
        T = slot_logits_TP.shape[0]
        router_logits_TE = slot_logits_TP.float().view(T, self.num_experts, self.slots_per_expert).logsumexp(-1)
        return router_logits_TE, slot_logits_TP


class MoeDispatcher(nn.Module):
    """Parameter-free capacity step between router and experts: applies the overflow policy to token-choice
    assignments, counts drops, and is where the final routing is recorded (`router_indices`, `dropped_tokens`).

    Padding (token_mask_T False) is never routed when a capacity limit is in force, so it never takes a slot,
    and the capacity is computed from the real tokens only. With dropless token choice padding is computed
    like any token (as in Mixtral); its output is masked downstream.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.policy = config.capacity_policy

    def forward(
        self,
        indices_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        choice_TE: torch.Tensor,
        scores_TE: torch.Tensor,
        capacity: int | None,
        token_mask_T: torch.Tensor | None = None,
        already_dispatched: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (indices_TK, weights_TK, dropped) with the sentinel E / weight 0 where dropped; `dropped` is a
        0-d int64 tensor: the assignments the router chose that did not run (for expert choice: the real
        tokens no expert took)."""
        E = self.num_experts
        if already_dispatched:  # expert choice: capacity was the selection itself
            unrouted_T = (indices_TK == E).all(dim=-1)
            if token_mask_T is not None:
                unrouted_T = unrouted_T & token_mask_T
            return indices_TK, weights_TK, unrouted_T.sum()
        if capacity is None:
            return indices_TK, weights_TK, torch.zeros((), dtype=torch.long, device=indices_TK.device)
        chosen_TK = torch.ones_like(indices_TK, dtype=torch.bool)
        if token_mask_T is not None:
            chosen_TK = token_mask_T[:, None].expand_as(indices_TK)
            indices_TK = indices_TK.masked_fill(~chosen_TK, E)
            weights_TK = weights_TK.masked_fill(~chosen_TK, 0.0)
        indices_TK, weights_TK = apply_capacity(indices_TK, weights_TK, choice_TE, scores_TE, capacity, self.policy)
        dropped = (chosen_TK & (indices_TK == E)).sum()
        return indices_TK, weights_TK, dropped


__all__ = [
    "CAPACITY_POLICIES",
    "ROUTER_TYPES",
    "TOKEN_CHOICE_ROUTERS",
    "MoeDispatcher",
    "MoeRouter",
    "SoftMoeRouter",
    "apply_capacity",
    "capacity_keep_mask",
    "expert_capacity",
    "expert_choice_routing",
    "from_position_groups",
    "group_limited_choice",
    "keep_topk_softmax",
    "next_choice_reroute",
    "priority_keep_mask",
    "soft_combine_weights",
    "soft_dispatch_weights",
    "switch_routing",
    "to_position_groups",
    "topk_softmax_routing",
]
