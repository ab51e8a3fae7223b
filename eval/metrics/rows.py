"""The input rows the routing `evaluate` modules share, and their checks.

Each example is one token: a list of its K expert indices, the sentinel `num_experts` for a dropped (or unchosen)
assignment, and a row of negative values (Trainer's -100 padding) for no token at all. The optional `layer`
keyword of `compute` gives each row's MoE layer, scored on its own.

The modules import this as a library (`from eval.metrics import rows`), as they import `modeling_moe`:
`evaluate.load(path)` copies only a module's own folder, so code the modules share cannot sit next to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import evaluate
import torch


def metric_info(description: str, citation: str, inputs_description: str, *columns: str) -> evaluate.MetricInfo:
    """The `MetricInfo` of a module whose inputs are `columns`, each a column of expert-index rows."""
    row = datasets.Sequence(datasets.Value("int64"))
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features(dict.fromkeys(columns, row)),
    )


def check_num_experts(num_experts) -> int:
    """`num_experts` itself. Raises ValueError unless it is an integer >= 1."""
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    return num_experts


def index_rows(rows: Sequence[Sequence[int]], name: str) -> torch.Tensor:
    """The (T, K) int64 tensor of the rows given as `name`. Raises ValueError when there are none."""
    if not rows:
        raise ValueError(f"{name} is empty: add at least one routed token")
    return torch.as_tensor(rows, dtype=torch.long)


def real_tokens(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T,) bool: the rows that are tokens, not padding (any index >= 0). Raises ValueError when a token has an
    index above the sentinel `num_experts`."""
    real_T = (indices_TK >= 0).any(dim=-1)
    if (indices_TK[real_T] > num_experts).any():
        raise ValueError(f"expert_indices must be in [0, num_experts={num_experts}] (num_experts = dropped)")
    return real_T


def per_layer(layer: Sequence[int], score: Callable[..., object], *rows_TK: torch.Tensor) -> tuple[list[int], list]:
    """The distinct layer indices of `layer` (one per row), sorted, and `score(*rows of that layer)` for each."""
    layer_T = torch.as_tensor(layer, dtype=torch.long)
    layers = sorted(set(layer_T.tolist()))
    return layers, [score(*(x[layer_T == i] for x in rows_TK)) for i in layers]
