"""Expert initialisation: the dense FFN of one layer -> E routed experts (`EXPERT_INITS`).

With the dense FFN down(act(gate x) * up x) of width I:
    copy            every expert is the dense FFN (Komatsuzaki et al. 2022, Sec. 3.1); `noise_std` > 0 adds
                    Gaussian noise of that many standard deviations of each dense matrix.
    drop_upcycling  each expert re-initialises a random fraction `drop_ratio` of its intermediate neurons (gate and
                    up rows, down columns), a different subset per expert, from N(mean, std) of the dense matrix
                    (Nakamura et al. 2025, "Drop-Upcycling", Sec. 3, Eq. 4-6).
    neuron_split    the I neurons are partitioned into E experts of I / E neurons each, at random or by balanced
                    clustering of the neurons' gate/up rows (LLaMA-MoE, Zhu et al. 2024, Sec. 3.1,
                    "Neuron-Independent"); each expert's down projection is scaled by `split_down_scale` (default E).
    shared_expert   (combinable with the three above) `shared_expert_tensors` keeps the dense FFN as an always-on
                    shared expert with its output scaled by `shared_expert_weight` (w); `init_experts` scales the
                    routed experts' down projections by 1 - w.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .clustering import balanced_kmeans
from .options import UpcycleOptions


@dataclass
class DenseFFN:
    """One dense SwiGLU FFN, y = down(act(gate x + bg) * (up x + bu)) + bd.

    gate, up: (I, D); down: (D, I); biases (I,), (I,), (D,) or None.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> DenseFFN:
        """From `{prefix}{gate,up,down}_proj.{weight,bias}` entries."""
        return cls(
            tensors[f"{prefix}gate_proj.weight"],
            tensors[f"{prefix}up_proj.weight"],
            tensors[f"{prefix}down_proj.weight"],
            tensors.get(f"{prefix}gate_proj.bias"),
            tensors.get(f"{prefix}up_proj.bias"),
            tensors.get(f"{prefix}down_proj.bias"),
        )


@dataclass
class ExpertWeights:
    """E routed experts in MoeExperts' layout: gate_up (E, 2I', D) [rows 0..I' gate, I'..2I' up], down (E, D, I'),
    and with a biased dense FFN (Llama `mlp_bias`) gate_up_bias (E, 2I') and down_bias (E, D)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _expert_biases(ffn: DenseFFN, parts: Sequence[torch.Tensor] | None, num_experts: int):
    """Expert biases from the dense FFN's: every expert copies them, or with a neuron split (`parts`) expert e takes
    the gate/up biases of its neurons P_e; the down bias is copied whole (the 1/E-weighted experts sum to it)."""
    if ffn.gate_bias is None:
        return None, None
    if parts is None:
        gate_up_bias = torch.cat([ffn.gate_bias, ffn.up_bias]).expand(num_experts, -1).contiguous()  # (E, 2I)
    else:
        gate_up_bias = torch.stack([torch.cat([ffn.gate_bias[p], ffn.up_bias[p]]) for p in parts])  # (E, 2I/E)
    return gate_up_bias, ffn.down_bias.expand(num_experts, -1).contiguous()  # (E, D)


def copy_experts(ffn: DenseFFN, num_experts: int) -> ExpertWeights:
    """Every expert is the dense FFN (Komatsuzaki et al. 2022, Sec. 3.1): (I, D) x 3 -> (E, 2I, D), (E, D, I)."""
    I, D = ffn.gate.shape
    gate_up = torch.empty(num_experts, 2 * I, D, dtype=ffn.gate.dtype)  # (E, 2I, D), filled in place: no temporary
    gate_up[:, :I] = ffn.gate
    gate_up[:, I:] = ffn.up
    down = ffn.down.unsqueeze(0).expand(num_experts, -1, -1).contiguous()  # (E, D, I)
    return ExpertWeights(gate_up, down, *_expert_biases(ffn, None, num_experts))


def add_noise(experts: ExpertWeights, ffn: DenseFFN, noise_std: float, generator: torch.Generator) -> ExpertWeights:
    """W_e + noise_std * std(W) * N(0, 1), independently per expert and entry, std(W) of the dense matrix."""
    I = ffn.gate.shape[0]
    scale_gu = torch.cat([ffn.gate.float().std().expand(I), ffn.up.float().std().expand(I)])[
        None, :, None
    ]  # (1, 2I, 1)
    gate_up = experts.gate_up.float() + noise_std * scale_gu * _randn(experts.gate_up.shape, generator)
    down = experts.down.float() + noise_std * ffn.down.float().std() * _randn(experts.down.shape, generator)
    return ExpertWeights(
        gate_up.to(experts.gate_up.dtype), down.to(experts.down.dtype), experts.gate_up_bias, experts.down_bias
    )


def _randn(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def drop_upcycle_experts(ffn: DenseFFN, num_experts: int, ratio: float, generator: torch.Generator) -> ExpertWeights:
    """Drop-Upcycling (Nakamura et al. 2025, Sec. 3, Eq. 4-6): start from copies, then for each expert pick a random
    subset S_e of round(ratio * I) intermediate neurons (independently per expert) and re-draw their gate and up
    rows and down columns from N(mean(W), std(W)^2), the statistics of the whole dense matrix W.

    Returns:
        ExpertWeights (E, 2I, D) / (E, D, I), the dense dtype.
    """
    I, D = ffn.gate.shape
    n_drop = round(ratio * I)
    stats = [(w.float().mean(), w.float().std()) for w in (ffn.gate, ffn.up, ffn.down)]
    experts = copy_experts(ffn, num_experts)
    gate_up, down = experts.gate_up, experts.down
    for e in range(num_experts):
        idx = torch.randperm(I, generator=generator)[:n_drop]  # S_e, a different subset per expert
        (mg, sg), (mu, su), (md, sd) = stats
        gate_up[e, idx] = (mg + sg * _randn((n_drop, D), generator)).to(gate_up.dtype)  # gate rows
        gate_up[e, I + idx] = (mu + su * _randn((n_drop, D), generator)).to(gate_up.dtype)  # up rows
        down[e][:, idx] = (md + sd * _randn((D, n_drop), generator)).to(down.dtype)  # down columns
    return ExpertWeights(gate_up, down, experts.gate_up_bias, experts.down_bias)  # biases copied, not re-drawn


def neuron_partition(ffn: DenseFFN, num_experts: int, mode: str, generator: torch.Generator) -> list[torch.Tensor]:
    """Partition the I intermediate neurons into E equal sets (LLaMA-MoE, Zhu et al. 2024, Sec. 3.1).

    mode "random": a random permutation cut into E blocks. mode "cluster": balanced k-means on each neuron's
    normalised [gate row, up row] (neurons that read the input alike go to the same expert).

    Returns:
        E sorted int64 index tensors of I / E neurons each, disjoint, covering 0..I-1.
    """
    I = ffn.gate.shape[0]
    m = I // num_experts
    if mode == "random":
        perm = torch.randperm(I, generator=generator)
        return [perm[e * m : (e + 1) * m].sort().values for e in range(num_experts)]
    features = torch.nn.functional.normalize(torch.cat([ffn.gate.float(), ffn.up.float()], dim=1), dim=1)  # (I, 2D)
    labels = balanced_kmeans(features, num_experts, generator)
    return [torch.nonzero(labels == e).squeeze(1) for e in range(num_experts)]


def neuron_split_experts(
    ffn: DenseFFN, num_experts: int, mode: str, down_scale: float, generator: torch.Generator
) -> ExpertWeights:
    """Neuron split (LLaMA-MoE, Zhu et al. 2024, Sec. 3.1): expert e keeps the neurons P_e of the dense FFN, so
    sum_e down[:, P_e] h[P_e] = FFN(x); each expert's down projection is scaled by `down_scale` (E makes the
    average of the E experts with weights 1 / E equal to the dense FFN).

    Returns:
        ExpertWeights (E, 2I/E, D) / (E, D, I/E), the dense dtype.
    """
    parts = neuron_partition(ffn, num_experts, mode, generator)
    gate_up = torch.stack([torch.cat([ffn.gate[p], ffn.up[p]], dim=0) for p in parts])  # (E, 2I/E, D)
    down = torch.stack([(ffn.down[:, p].float() * down_scale).to(ffn.down.dtype) for p in parts])  # (E, D, I/E)
    return ExpertWeights(gate_up, down, *_expert_biases(ffn, parts, num_experts))


def shared_expert_tensors(ffn: DenseFFN, weight: float) -> dict[str, torch.Tensor]:
    """The dense FFN as the shared expert, its output scaled by `weight` (down weight and bias times w): suffix ->
    tensor under `mlp.shared_expert.`."""
    out = {"gate_proj.weight": ffn.gate, "up_proj.weight": ffn.up}
    out["down_proj.weight"] = ffn.down if weight == 1.0 else (ffn.down.float() * weight).to(ffn.down.dtype)
    if ffn.gate_bias is not None:
        out["gate_proj.bias"] = ffn.gate_bias
        out["up_proj.bias"] = ffn.up_bias
        out["down_proj.bias"] = (
            ffn.down_bias if weight == 1.0 else (ffn.down_bias.float() * weight).to(ffn.down_bias.dtype)
        )
    return out


def _copy_init(ffn: DenseFFN, o: UpcycleOptions, generator: torch.Generator) -> ExpertWeights:
    experts = copy_experts(ffn, o.num_experts)
    return add_noise(experts, ffn, o.noise_std, generator) if o.noise_std > 0 else experts


def _drop_init(ffn: DenseFFN, o: UpcycleOptions, generator: torch.Generator) -> ExpertWeights:
    return drop_upcycle_experts(ffn, o.num_experts, o.drop_ratio, generator)


def _split_init(ffn: DenseFFN, o: UpcycleOptions, generator: torch.Generator) -> ExpertWeights:
    scale = o.split_down_scale if o.split_down_scale is not None else float(o.num_experts)
    return neuron_split_experts(ffn, o.num_experts, o.split_mode, scale, generator)


# expert_init name -> strategy (dense FFN, options, generator) -> ExpertWeights
EXPERT_INITS: dict[str, Callable[[DenseFFN, UpcycleOptions, torch.Generator], ExpertWeights]] = {
    "copy": _copy_init,
    "drop_upcycling": _drop_init,
    "neuron_split": _split_init,
}


def init_experts(ffn: DenseFFN, options: UpcycleOptions, generator: torch.Generator) -> ExpertWeights:
    """Apply `EXPERT_INITS[options.expert_init]`, then scale the routed down projections by 1 - shared_expert_weight
    when a shared expert carries that share of the output."""
    experts = EXPERT_INITS[options.expert_init](ffn, options, generator)
    if options.shared_expert and options.shared_expert_weight != 0.0:
        routed = 1.0 - options.shared_expert_weight
        experts.down = (experts.down.float() * routed).to(experts.down.dtype)
        if experts.down_bias is not None:
            experts.down_bias = (experts.down_bias.float() * routed).to(experts.down_bias.dtype)
    return experts
