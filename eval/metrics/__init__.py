"""Routing metrics as local `evaluate` modules, and the glue to use them from `Trainer`'s `compute_metrics`.

    evaluate.load(metric_path("moe_load_cv"))            # or evaluate.load("eval/metrics/moe_load_cv")
    trainer = Trainer(..., preprocess_logits_for_metrics=routing_indices_for_metrics,
                      compute_metrics=RoutingComputeMetrics(num_experts=config.num_local_experts))

The model's config needs `output_router_logits=True`, so that evaluation outputs carry `router_indices`.
`routing_indices_for_metrics` keeps only them, as one (B, S, L, K) tensor per batch with -100 on tokens whose
label is -100 (padding); Trainer concatenates the batches and pads with -100, which the modules ignore.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("moe_load_cv", "moe_drop_rate", "moe_routing_agreement")


def metric_path(name: str) -> str:
    """The folder `evaluate.load` takes for one of `METRIC_NAMES`.

    Raises:
        ValueError: unknown name.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"metric name must be one of {METRIC_NAMES}, got {name!r}")
    return str(METRICS_DIR / name)


def routing_indices_for_metrics(outputs, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics` for Trainer: keep the router indices of an MoE model's eval outputs.

    Args:
        outputs: what Trainer passes: the model outputs without the loss (a tuple); the router indices are the
            tuple of L integer (B * S, K) tensors among them.
        labels: (B, S) labels; -100 marks tokens to ignore.
    Returns:
        (B, S, L, K) int64 expert indices, -100 where the label is -100.
    Raises:
        ValueError: the outputs hold no router indices (set `config.output_router_logits = True`).
    """
    candidates = [
        x
        for x in (outputs if isinstance(outputs, (tuple, list)) else (outputs,))
        if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor) and not x[0].is_floating_point()
    ]
    if not candidates:
        raise ValueError("no router indices in the model outputs: set model.config.output_router_logits = True")
    B, S = labels.shape
    indices = torch.stack([t.reshape(B, S, -1) for t in candidates[0]], dim=2)  # (B, S, L, K)
    return indices.masked_fill((labels == -100)[:, :, None, None], -100)


class RoutingComputeMetrics:
    """`compute_metrics` for Trainer: load CV, drop rate and consecutive-layer agreement from the `evaluate`
    modules, on predictions prepared by `routing_indices_for_metrics`.

    Returns (when called with an `EvalPrediction`): {"load_cv", "load_entropy", "dead_experts", "drop_rate",
    "consecutive_layer_agreement"} (means over MoE layers; agreement only with 2+ MoE layers).
    """

    def __init__(self, num_experts: int) -> None:
        import evaluate

        self.num_experts = num_experts
        self.load_cv = evaluate.load(metric_path("moe_load_cv"))
        self.drop_rate = evaluate.load(metric_path("moe_drop_rate"))
        self.agreement = evaluate.load(metric_path("moe_routing_agreement"))

    def __call__(self, eval_prediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        predictions = predictions[0] if isinstance(predictions, tuple) else predictions
        indices = np.asarray(predictions)  # (N, S, L, K)
        L, K = indices.shape[2], indices.shape[3]
        rows = indices.transpose(2, 0, 1, 3).reshape(L, -1, K)  # (L, N * S, K)
        real = (rows >= 0).any(axis=-1).any(axis=0)  # same tokens in every layer
        rows = rows[:, real]
        layer = np.repeat(np.arange(L), rows.shape[1]).tolist()
        flat = rows.reshape(-1, K).tolist()
        load = self.load_cv.compute(expert_indices=flat, layer=layer, num_experts=self.num_experts)
        drops = self.drop_rate.compute(expert_indices=flat, layer=layer, num_experts=self.num_experts)
        metrics = {
            "load_cv": load["load_cv"],
            "load_entropy": load["load_entropy"],
            "dead_experts": float(load["dead_experts"]),
            "drop_rate": drops["drop_rate"],
        }
        if L > 1:
            pairs = self.agreement.compute(
                predictions=rows[:-1].reshape(-1, K).tolist(),
                references=rows[1:].reshape(-1, K).tolist(),
                layer=np.repeat(np.arange(L - 1), rows.shape[1]).tolist(),
                num_experts=self.num_experts,
            )
            metrics["consecutive_layer_agreement"] = pairs["topk_agreement"]
        return metrics


__all__ = ["METRICS_DIR", "METRIC_NAMES", "RoutingComputeMetrics", "metric_path", "routing_indices_for_metrics"]
