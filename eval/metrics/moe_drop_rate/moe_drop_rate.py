"""`evaluate` module: fraction of token-choice routing assignments dropped by expert capacity.

Load with `evaluate.load("eval/metrics/moe_drop_rate")`. Computed by `modeling_moe.routing_stats`: the kept
assignments are counted with `expert_counts`, the rest of the real tokens' K assignments were dropped, and
`dropped_fraction` divides by the assignments the router made.
"""

from __future__ import annotations

import evaluate
import torch

from eval.metrics import rows
from modeling_moe import routing_stats

_DESCRIPTION = """
Dropped-assignment fraction of token-choice mixture-of-experts routing (Switch Transformer capacity). Each example
is one token: `expert_indices` lists the experts its K assignments ran on, the sentinel `num_experts` marking a
dropped one (`MoeCausalLMOutput.router_indices`). A row of negative values (Trainer's -100 padding) is ignored.
Expert-choice routing marks unchosen (not dropped) pairs with the sentinel, so this metric is for token choice.
"""

_KWARGS_DESCRIPTION = """
Args:
    expert_indices: list of per-token lists of K expert indices (ints in [0, num_experts]; negative = padding).
    layer: optional keyword of `compute`: the MoE layer index of every token (all rows added so far).
    num_experts: E, the number of experts (required).
Returns:
    drop_rate: dropped assignments / (real tokens * K), over all layers.
    drop_rate_per_layer (with `layer`): the same per MoE layer; layers: the layer indices.
Examples:
    >>> metric = evaluate.load("eval/metrics/moe_drop_rate")
    >>> metric.compute(expert_indices=[[0], [4], [1], [4]], num_experts=4)["drop_rate"]
    0.5
"""

_CITATION = """
@article{fedus2021switch, title={Switch Transformers}, author={Fedus, William and Zoph, Barret and Shazeer, Noam},
journal={arXiv preprint arXiv:2101.03961}, year={2021}}
"""


def _dropped(indices_TK: torch.Tensor, num_experts: int) -> tuple[float, int, int]:
    """(dropped assignments, real tokens, K) of one layer."""
    real_T = rows.real_tokens(indices_TK, num_experts)
    kept = float(routing_stats.expert_counts(indices_TK.clamp(min=0), num_experts, real_T).sum())
    n_real, k = int(real_T.sum()), indices_TK.shape[1]
    return n_real * k - kept, n_real, k


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MoeDropRate(evaluate.Metric):
    """Drop rate of MoE routing (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return rows.metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "expert_indices")

    def _compute(self, expert_indices, layer=None, num_experts=None) -> dict:
        num_experts = rows.check_num_experts(num_experts)
        indices_TK = rows.index_rows(expert_indices, "expert_indices")
        if layer is None:
            dropped, n_real, k = _dropped(indices_TK, num_experts)
            return {"drop_rate": routing_stats.dropped_fraction(dropped, n_real, k)}
        layers, parts = rows.per_layer(layer, lambda x_TK: _dropped(x_TK, num_experts), indices_TK)
        k = indices_TK.shape[1]
        return {
            "drop_rate": routing_stats.dropped_fraction(sum(p[0] for p in parts), sum(p[1] for p in parts), k),
            "layers": layers,
            "drop_rate_per_layer": [routing_stats.dropped_fraction(*p) for p in parts],
        }
