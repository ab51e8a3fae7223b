"""`evaluate` module: top-k agreement between two routings of the same tokens.

Load with `evaluate.load("eval/metrics/moe_routing_agreement")`. Computed by `modeling_moe.routing_stats.topk_agreement`
(for each token |A ∩ B| / |A|, sentinels ignored, averaged over tokens).
"""

from __future__ import annotations

import evaluate
import torch

from eval.metrics import rows
from modeling_moe import routing_stats

_DESCRIPTION = """
Routing agreement of mixture-of-experts models: how often two routings (a fine-tuned model and its base, two
layers, two checkpoints) send the same token to the same experts. Each example is one token: `predictions` and
`references` list the K experts each routing picked (the sentinel `num_experts` = dropped, ignored). Rows whose
values are all negative in both (Trainer's -100 padding) are ignored.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per-token lists of expert indices of routing A.
    references: per-token lists of expert indices of routing B (same tokens).
    layer: optional keyword of `compute`: the MoE layer index of every token (all rows added so far).
    num_experts: E, the number of experts (required).
Returns:
    topk_agreement: mean over tokens of |A ∩ B| / |A| (1 = identical expert sets); mean over layers with `layer`.
    topk_agreement_per_layer, layers (with `layer`).
Examples:
    >>> metric = evaluate.load("eval/metrics/moe_routing_agreement")
    >>> metric.compute(predictions=[[0, 1], [2, 3]], references=[[1, 0], [2, 0]], num_experts=4)["topk_agreement"]
    0.75
"""

_CITATION = """
@article{zoph2022stmoe, title={ST-MoE: Designing Stable and Transferable Sparse Expert Models},
author={Zoph, Barret and others}, journal={arXiv preprint arXiv:2202.08906}, year={2022}}
"""


def _agreement(a_TK: torch.Tensor, b_TK: torch.Tensor, num_experts: int) -> float:
    real_T = (a_TK >= 0).any(dim=-1) | (b_TK >= 0).any(dim=-1)
    for name, x in (("predictions", a_TK), ("references", b_TK)):
        if (x[real_T] > num_experts).any() or (x[real_T] < 0).any():
            raise ValueError(f"{name} must hold expert indices in [0, num_experts={num_experts}] for real tokens")
    return routing_stats.topk_agreement(a_TK.clamp(min=0), b_TK.clamp(min=0), num_experts, real_T)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MoeRoutingAgreement(evaluate.Metric):
    """Top-k routing agreement (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return rows.metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "predictions", "references")

    def _compute(self, predictions, references, layer=None, num_experts=None) -> dict:
        num_experts = rows.check_num_experts(num_experts)
        a_TK = rows.index_rows(predictions, "predictions")
        b_TK = torch.as_tensor(references, dtype=torch.long)
        if a_TK.shape[0] != b_TK.shape[0]:
            raise ValueError(f"predictions cover {a_TK.shape[0]} tokens and references {b_TK.shape[0]}")
        if layer is None:
            return {"topk_agreement": _agreement(a_TK, b_TK, num_experts)}
        layers, per_layer = rows.per_layer(layer, lambda a, b: _agreement(a, b, num_experts), a_TK, b_TK)
        return {
            "topk_agreement": sum(per_layer) / len(per_layer),
            "layers": layers,
            "topk_agreement_per_layer": per_layer,
        }
