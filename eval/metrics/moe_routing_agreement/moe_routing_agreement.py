"""`evaluate` module: top-k agreement between two routings of the same tokens.

Load with `evaluate.load("eval/metrics/moe_routing_agreement")`. Computed by `modeling_moe.routing_stats.topk_agreement`
(for each token |A ∩ B| / |A|, sentinels ignored, averaged over tokens).
"""

from __future__ import annotations

import datasets
import evaluate
import torch

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
        seq = datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": seq, "references": seq}),
        )

    def _compute(self, predictions, references, layer=None, num_experts=None) -> dict:
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if not predictions:
            raise ValueError("predictions is empty: add at least one routed token")
        a_TK = torch.as_tensor(predictions, dtype=torch.long)
        b_TK = torch.as_tensor(references, dtype=torch.long)
        if a_TK.shape[0] != b_TK.shape[0]:
            raise ValueError(f"predictions cover {a_TK.shape[0]} tokens and references {b_TK.shape[0]}")
        if layer is None:
            return {"topk_agreement": _agreement(a_TK, b_TK, num_experts)}
        layer_T = torch.as_tensor(layer, dtype=torch.long)
        layers = sorted(set(layer_T.tolist()))
        per_layer = [_agreement(a_TK[layer_T == i], b_TK[layer_T == i], num_experts) for i in layers]
        return {
            "topk_agreement": sum(per_layer) / len(per_layer),
            "layers": layers,
            "topk_agreement_per_layer": per_layer,
        }
