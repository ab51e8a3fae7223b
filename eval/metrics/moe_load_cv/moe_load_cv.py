"""`evaluate` module: coefficient of variation (and entropy) of the expert load of an MoE layer.

Load with `evaluate.load("eval/metrics/moe_load_cv")`. Computed by `modeling_moe.routing_stats` (`expert_counts`,
`load_cv`, `load_entropy`, `dead_experts`, `load_fractions`).
"""

from __future__ import annotations

import evaluate
import torch

from eval.metrics import rows
from modeling_moe import routing_stats

_DESCRIPTION = """
Expert load balance of mixture-of-experts routing. Each example is one token: `expert_indices` lists the experts
its assignments ran on (K values, the sentinel `num_experts` for a dropped assignment; a row of negative values,
such as Trainer's -100 padding, is ignored). With the optional `layer` keyword of `compute`, each MoE layer is
scored on its own and the result also holds per-layer lists.
"""

_KWARGS_DESCRIPTION = """
Args:
    expert_indices: list of per-token lists of K expert indices (ints in [0, num_experts]; negative = padding).
    layer: optional keyword of `compute`: the MoE layer index of every token (all rows added so far).
    num_experts: E, the number of experts (required).
Returns:
    load_cv: population std / mean of the per-expert counts (0 = balanced; mean over layers with `layer`).
    load_entropy: entropy in nats of the load distribution (log E when balanced).
    dead_experts: number of experts that received no token (summed over layers with `layer`).
    load: load fractions per expert (per layer with `layer`).
Examples:
    >>> metric = evaluate.load("eval/metrics/moe_load_cv")
    >>> metric.compute(expert_indices=[[0, 1], [0, 2], [3, 0]], num_experts=4)["dead_experts"]
    0
"""

_CITATION = """
@article{fedus2021switch, title={Switch Transformers}, author={Fedus, William and Zoph, Barret and Shazeer, Noam},
journal={arXiv preprint arXiv:2101.03961}, year={2021}}
"""


def _layer_stats(indices_TK: torch.Tensor, num_experts: int) -> dict:
    real_T = rows.real_tokens(indices_TK, num_experts)
    counts_E = routing_stats.expert_counts(indices_TK.clamp(min=0), num_experts, real_T)
    return {
        "load_cv": routing_stats.load_cv(counts_E),
        "load_entropy": routing_stats.load_entropy(counts_E),
        "dead_experts": len(routing_stats.dead_experts(counts_E)),
        "load": routing_stats.load_fractions(counts_E).tolist(),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MoeLoadCv(evaluate.Metric):
    """Load CV of MoE routing (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return rows.metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "expert_indices")

    def _compute(self, expert_indices, layer=None, num_experts=None) -> dict:
        num_experts = rows.check_num_experts(num_experts)
        indices_TK = rows.index_rows(expert_indices, "expert_indices")
        if layer is None:
            return _layer_stats(indices_TK, num_experts)
        layers, per_layer = rows.per_layer(layer, lambda x_TK: _layer_stats(x_TK, num_experts), indices_TK)
        return {
            "load_cv": sum(s["load_cv"] for s in per_layer) / len(per_layer),
            "load_entropy": sum(s["load_entropy"] for s in per_layer) / len(per_layer),
            "dead_experts": sum(s["dead_experts"] for s in per_layer),
            "layers": layers,
            "load_cv_per_layer": [s["load_cv"] for s in per_layer],
            "load": [s["load"] for s in per_layer],
        }
