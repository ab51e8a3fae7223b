"""Losses as pure functions. No global state.

Router losses take router logits and a token mask; `linear_cross_entropy` is the LM loss computed from the last
hidden states and the LM head's weight without materialising the logits.

Shape legend: T tokens of one layer (batch * sequence, flattened), E experts, K experts per token,
B batch, S sequence length, N loss positions, D hidden size, V vocabulary size. `router_logits` is a sequence
with one (T, E) tensor per MoE layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def _token_weights(attention_mask_BS: torch.Tensor | None, num_rows: int, device) -> torch.Tensor | None:
    """Flatten a (B, S) 0/1 mask into a float (T,) weight per router row, or None when no mask is given."""
    if attention_mask_BS is None:
        return None
    mask_T = attention_mask_BS.reshape(-1).to(device=device, dtype=torch.float32)
    if mask_T.numel() != num_rows:
        raise ValueError(
            f"attention_mask has {mask_T.numel()} positions but the router saw {num_rows} tokens; pass the mask "
            "of the tokens in this forward pass, shape (batch, sequence)"
        )
    return mask_T


def _mean_over_layers(
    router_logits: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None,
    layer_loss: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """`layer_loss(logits_TE, mask_T)` of every MoE layer, averaged over layers; 0 when there are none. The logits
    are moved to the first layer's device; mask_T is the (T,) float token weight of `_token_weights`, or None."""
    if len(router_logits) == 0:
        return torch.zeros(())
    device = router_logits[0].device
    mask_T = _token_weights(attention_mask, router_logits[0].shape[0], device)
    return torch.stack([layer_loss(logits_TE.to(device), mask_T) for logits_TE in router_logits]).mean()


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch / GShard auxiliary load-balancing loss, pooled over all MoE layers (transformers' convention).

    loss = E * sum_i f_i * P_i (Fedus et al. 2021, Eq. 4), where f_i is the fraction of tokens whose top-k
    includes expert i (Eq. 5, so sum_i f_i = k) and P_i the mean router probability of expert i (Eq. 6).
    Uniform router probabilities give exactly k. Rows where `attention_mask` is 0 are left out of both means.

    Args:
        router_logits: one (T, E) tensor per MoE layer, all layers with the same T.
        num_experts: E. top_k: K.
        attention_mask: optional (B, S) mask with B * S = T; 1 = real token, 0 = padding.
    Returns:
        A float32 scalar tensor (0 when there are no MoE layers).
    """
    if len(router_logits) == 0:
        return torch.zeros(())
    device = router_logits[0].device
    mask_T = _token_weights(attention_mask, router_logits[0].shape[0], device)
    counts_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits_TE in router_logits:
        probs_TE = F.softmax(logits_TE.to(device), dim=-1, dtype=torch.float32)
        _, selected_TK = torch.topk(probs_TE, top_k, dim=-1)
        weight_T = mask_T if mask_T is not None else probs_TE.new_ones(probs_TE.shape[0])
        counts_E = counts_E.scatter_add(0, selected_TK.reshape(-1), weight_T.repeat_interleave(top_k))
        prob_sum_E = prob_sum_E + (probs_TE * weight_T[:, None]).sum(dim=0)
        rows = rows + weight_T.sum()
    rows = rows.clamp_min(1.0)
    f_E = counts_E / rows  # Eq. 5 (summed over the k choices)
    P_E = prob_sum_E / rows  # Eq. 6
    return num_experts * torch.sum(f_E * P_E)  # Eq. 4


def load_balancing_loss_per_layer(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Switch / GShard loss computed for each MoE layer alone, then averaged over layers.

    Pooling all layers (`load_balancing_loss`) lets one imbalanced layer hide behind balanced ones, because the
    pooled counts average out; per-layer losses penalise each layer's own imbalance.

    Returns:
        A float32 scalar tensor (0 when there are no MoE layers).
    """
    if len(router_logits) == 0:
        return torch.zeros(())
    losses = [load_balancing_loss([logits_TE], num_experts, top_k, attention_mask) for logits_TE in router_logits]
    return torch.stack(losses).mean()


def importance_loss(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Importance loss of Shazeer et al. 2017 (Eq. 6-7): CV(Importance)^2 per layer, averaged over layers.

    Importance_i = sum over tokens of the router probability of expert i (softmax of the logits, for every
    router type). CV = std / mean over experts, with the population standard deviation (divide by E, not E-1).
    The coefficient w_importance is applied by the caller.

    Returns:
        A float32 scalar tensor (0 when there are no MoE layers).
    """
    return _mean_over_layers(router_logits, attention_mask, _importance_cv_squared)


def _importance_cv_squared(logits_TE: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
    probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
    if mask_T is not None:
        probs_TE = probs_TE * mask_T[:, None]
    importance_E = probs_TE.sum(dim=0)  # Eq. 6
    cv = importance_E.std(correction=0) / importance_E.mean().clamp_min(1e-20)  # population std
    return cv**2  # Eq. 7 without w_importance


def router_z_loss(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (Zoph et al. 2022, Eq. 5), mean over layers.

    Args:
        router_logits: one (T, E) tensor per MoE layer.
        attention_mask: optional (B, S) mask with B * S = T; padding rows are left out.
    Returns:
        A float32 scalar tensor (0 when there are no MoE layers).
    """
    return _mean_over_layers(router_logits, attention_mask, _z_loss)


def _z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
    z_T = torch.logsumexp(logits_TE.float(), dim=-1) ** 2  # Eq. 5
    if mask_T is None:
        return z_T.mean()
    return (z_T * mask_T).sum() / mask_T.sum().clamp_min(1.0)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_n CE(h_n W^T, y_n) / divisor, chunk by chunk, with the gradients computed in the forward.

    Per chunk of c rows: logits (c, V) in float32, their logsumexp, the loss terms, and
    dL/dlogits = (softmax - onehot(y)) * valid / divisor, which the backward of log-softmax would produce; then
    dL/dh = dL/dlogits W and dL/dW += dL/dlogits^T h. Only one (c, V) block is alive at a time. The backward
    scales the saved gradients by the incoming one (the loss is a scalar, so that is exact).
    """

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, divisor, ignore_index, chunk_size):
        N = hidden_ND.shape[0]
        device_type = hidden_ND.device.type
        compute_dtype = hidden_ND.dtype
        if torch.is_autocast_enabled(device_type):  # as autocast would run the LM head's F.linear
            compute_dtype = torch.get_autocast_dtype(device_type)
        need_h, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(device_type, enabled=False):
            h_ND, w_VD = hidden_ND.to(compute_dtype), weight_VD.to(compute_dtype)
            valid_N = labels_N != ignore_index
            safe_N = labels_N.masked_fill(~valid_N, 0)  # (N,) an in-range index for ignored rows
            scale_N = valid_N.to(torch.float32) / divisor  # (N,) d loss / d (per-row CE)
            loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
            grad_h = torch.empty_like(h_ND) if need_h else None
            # 16-bit weights: the per-chunk products are summed in float32 and rounded once at the end
            grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
            for start in range(0, N, chunk_size):
                rows = slice(start, start + chunk_size)
                logits_cV = F.linear(h_ND[rows], w_VD).float()  # transformers' ForCausalLMLoss upcasts too
                lse_c = torch.logsumexp(logits_cV, dim=-1)
                target_c = logits_cV.gather(1, safe_N[rows, None]).squeeze(1)
                loss += ((lse_c - target_c) * valid_N[rows]).sum()  # CE = logsumexp(z) - z_y
                if not (need_h or need_w):
                    continue
                grad_cV = logits_cV.sub_(lse_c[:, None]).exp_()  # softmax, in place of the logits
                grad_cV.scatter_add_(1, safe_N[rows, None], torch.full_like(target_c[:, None], -1.0))  # - onehot(y)
                grad_cV = grad_cV.mul_(scale_N[rows, None]).to(compute_dtype)
                if need_h:
                    torch.mm(grad_cV, w_VD, out=grad_h[rows])  # (c, D)
                if need_w:
                    grad_w.add_(torch.mm(grad_cV.t(), h_ND[rows]))  # (V, D)
            loss = loss / divisor
        ctx.save_for_backward(
            grad_h.to(hidden_ND.dtype) if need_h else None, grad_w.to(weight_VD.dtype) if need_w else None
        )
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        grad_w = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight^T` against `labels`, without materialising the (N, V) logits.

    Equal to `F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=ignore_index)` (the mean
    over non-ignored rows), or to its sum divided by `num_items_in_batch` when that is given: exactly what
    transformers' `ForCausalLMLoss` computes from already shifted labels. Logits exist `chunk_size` rows at a
    time, so peak memory drops from N * V floats to chunk_size * V, and the big (N, V) buffers are never
    allocated (on the CPU they page-fault on every step). The gradients of `hidden` and `weight` are computed in
    the forward, which therefore costs the LM head's forward and backward GEMMs, and only when grad mode is on
    and one of them requires grad. Under autocast, the GEMMs run in the autocast dtype, as `F.linear` would.

    Args:
        hidden: (N, D) or (..., D) last hidden states at the loss positions.
        weight: (V, D) LM head weight (no bias).
        labels: (N,) or (...) target ids in [0, V), or `ignore_index`.
        ignore_index: label value that contributes nothing.
        num_items_in_batch: divide the summed loss by this instead of the number of non-ignored labels.
        chunk_size: rows per chunk, >= 1.
    Returns:
        A float32 scalar; NaN when every label is ignored and `num_items_in_batch` is None, as in torch.
    Raises:
        ValueError: shapes disagree, `chunk_size` < 1, or a label is outside [0, V) and not `ignore_index`.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be (vocab, hidden) with hidden = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got weight {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the shape of hidden without its last dim, "
            f"{tuple(hidden.shape[:-1])}"
        )
    hidden_ND, labels_N = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).to(hidden.device)
    V = weight.shape[0]
    bad = (labels_N != ignore_index) & ((labels_N < 0) | (labels_N >= V))
    if not torch.compiler.is_compiling() and bool(bad.any()):  # compiled: no host sync (gather still raises)
        raise ValueError(
            f"labels must be in [0, {V}) or ignore_index ({ignore_index}); got {labels_N[bad][:5].tolist()}"
        )
    if num_items_in_batch is None:
        divisor = (labels_N != ignore_index).sum().to(torch.float32)
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device).to(torch.float32)
    return _LinearCrossEntropy.apply(hidden_ND, weight, labels_N, divisor, ignore_index, chunk_size)


__all__ = [
    "importance_loss",
    "linear_cross_entropy",
    "load_balancing_loss",
    "load_balancing_loss_per_layer",
    "router_z_loss",
]
