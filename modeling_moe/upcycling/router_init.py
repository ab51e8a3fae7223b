"""Router initialisation (`ROUTER_INITS`) and the calibration data the "hidden" router needs.

zeros: every expert weighted 1 / E. normal: N(0, router_std^2). hidden: spherical k-means centroids of that layer's
MLP inputs on a calibration text set (mergekit's "hidden" gate initialisation, done with clustering), computed by
`hidden_routers` before the streaming conversion starts (it runs the dense model once). A router whose rows are
near-equal is reported with `DegenerateRouterWarning`: its experts would receive the same tokens.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..checkpoint import load_pretrained
from .clustering import spherical_kmeans
from .options import UpcycleOptions, UpcyclingError, layer_generator


class DegenerateRouterWarning(UserWarning):
    """A router has (near-)equal rows: its experts receive the same tokens and, if identical, never diverge."""


def zeros_router(num_experts: int, hidden_size: int, **_) -> torch.Tensor:
    """All-zero router: equal weights 1 / E for every token; top-k ties go to the lowest indices. (E, D)."""
    return torch.zeros(num_experts, hidden_size)


def normal_router(num_experts: int, hidden_size: int, *, std: float, generator: torch.Generator, **_) -> torch.Tensor:
    """Router rows drawn from N(0, std^2), as a freshly initialised MoE. (E, D) float32."""
    return std * torch.randn((num_experts, hidden_size), generator=generator, dtype=torch.float32)


# router_init name -> strategy (E, D, std=, generator=) -> (E, D); "hidden" is `hidden_state_router` on the
# calibration inputs (see `hidden_routers`).
ROUTER_INITS: dict[str, Callable[..., torch.Tensor]] = {"zeros": zeros_router, "normal": normal_router}


def hidden_state_router(
    x_ND: torch.Tensor, num_experts: int, generator: torch.Generator, scale: float = 1.0, iters: int = 50
) -> torch.Tensor:
    """Router rows from k-means centroids of a layer's MLP inputs, so that at step 0 the router's dot product
    picks the nearest centroid (mergekit's "hidden" gate init, done with clustering).

    Centring without a router bias: with u the unit mean direction, P = 1 - u u^T projects it out. The projected
    inputs P x have mean P mean = 0 (centred), and for any row c orthogonal to u, c . x = c . P x exactly. The
    inputs z = P x / |P x| are clustered by spherical k-means into unit centroids c_e (orthogonal to u), and the
    router row is W_e = scale * c_e / median|P x|, so argmax_e W_e . x = argmax_e c_e . z (nearest centroid) and a
    typical token's best logit is about `scale`.

    Args:
        x_ND: MLP inputs (post-attention-norm hidden states), (N, D), N >= E.
        num_experts: E. generator: seeds k-means++. scale: logit scale of a typical token.
    Returns:
        W (E, D) float32.
    Raises:
        UpcyclingError: fewer than E inputs with a component off the mean direction.
    """
    x = x_ND.float()
    mean_D = x.mean(dim=0)
    u_D = mean_D / mean_D.norm().clamp_min(1e-12)
    z = x - (x @ u_D)[:, None] * u_D  # P x, centred
    norms_N = z.norm(dim=1)
    keep = norms_N > 1e-6 * norms_N.max().clamp_min(1e-30)
    if int(keep.sum()) < num_experts:
        raise UpcyclingError(
            f"router_init='hidden' needs at least num_experts ({num_experts}) calibration tokens with distinct "
            f"hidden states, got {int(keep.sum())}; give more calibration_texts"
        )
    z = z[keep] / norms_N[keep, None]
    centroids_ED = spherical_kmeans(z, num_experts, generator, iters)
    centroids_ED = centroids_ED - (centroids_ED @ u_D)[:, None] * u_D  # exactly orthogonal to u (rounding)
    centroids_ED = torch.nn.functional.normalize(centroids_ED, dim=1)
    return centroids_ED * (scale / norms_N[keep].median())


def degenerate_router_pairs(weight_ED: torch.Tensor, tol: float = 0.1) -> list[tuple[int, int]]:
    """Pairs of experts whose router rows are near-equal: |w_i - w_j| <= tol * mean_e |w_e| (an all-zero router
    has every pair). Such experts get the same tokens; copies of the same FFN then never diverge."""
    w = weight_ED.float()
    scale = float(w.norm(dim=1).mean())
    dist = torch.cdist(w, w)
    E = w.shape[0]
    return [(i, j) for i in range(E) for j in range(i + 1, E) if float(dist[i, j]) <= tol * scale]


def warn_if_degenerate(weight_ED: torch.Tensor, layer_idx: int, router_init: str) -> None:
    pairs = degenerate_router_pairs(weight_ED)
    if pairs:
        warnings.warn(
            f"layer {layer_idx}: router (router_init={router_init!r}) is degenerate, near-equal rows for expert "
            f"pairs {pairs[:8]}{' ...' if len(pairs) > 8 else ''}; those experts receive the same tokens (with copy "
            "init they then stay identical). Use router_init='normal', or 'hidden' with more varied calibration text",
            DegenerateRouterWarning,
            stacklevel=3,
        )


def calibration_batches(texts: Sequence[str], tokenizer, max_tokens: int, max_length: int = 512) -> list[torch.Tensor]:
    """Tokenise texts one by one (no padding) until `max_tokens` tokens: a list of (1, S) id tensors."""
    batches, total = [], 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        if ids.shape[1] == 0:
            continue
        ids = ids[:, : max_tokens - total]
        batches.append(ids)
        total += ids.shape[1]
        if total >= max_tokens:
            break
    return batches


@torch.no_grad()
def collect_mlp_inputs(
    model: PreTrainedModel, batches: Sequence[torch.Tensor], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Run the dense model on `batches` and record each listed layer's MLP input (the post-attention RMSNorm
    output). Returns layer -> (N, D) float32, N the number of calibration tokens."""
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    decoder_layers = model.get_decoder().layers
    hooks = [
        decoder_layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]).float())
        )
        for i in layers
    ]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids.to(model.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {i: torch.cat(v) for i, v in captured.items()}


def hidden_routers(
    dense: PreTrainedModel | Path, texts: Sequence[str] | None, tokenizer, options: UpcycleOptions
) -> dict[int, torch.Tensor]:
    """Router weights (E, D) for every MoE layer from calibration text (`router_init="hidden"`).

    Raises:
        UpcyclingError: no calibration texts, no tokenizer, or too few tokens.
    """
    if not texts:
        raise UpcyclingError("router_init='hidden' needs calibration_texts (a list of strings)")
    if tokenizer is None:
        raise UpcyclingError("router_init='hidden' needs a tokenizer (an object or a path) for the calibration_texts")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    batches = calibration_batches(texts, tokenizer, options.calibration_max_tokens)
    model = dense if isinstance(dense, PreTrainedModel) else load_pretrained(AutoModelForCausalLM, dense)
    inputs = collect_mlp_inputs(model, batches, options.moe_layers)
    del model
    return {
        i: hidden_state_router(x, options.num_experts, layer_generator(options.seed, i), options.router_scale)
        for i, x in inputs.items()
    }
