"""Sparse upcycling: turn a dense Llama / Mistral / Qwen2 checkpoint into a `MoeForCausalLM`, streaming.

Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints") starts an MoE from a trained dense model: every weight outside the FFNs is copied, and each chosen
layer's FFN becomes E experts plus a new router. This package does that as a declarative key map (`KEY_MAP`,
`MOE_LAYER_KEYS`) plus small, separate initialisation strategies:

Experts (`expert_init.EXPERT_INITS`, each strategy described there): copy, optionally with noise (Komatsuzaki
et al. 2022, Sec. 3.1); drop_upcycling (Nakamura et al. 2025); neuron_split, random or by balanced clustering
(LLaMA-MoE, Zhu et al. 2024); and, combinable with any of them, the dense FFN kept as a shared expert.

Router (`router_init.ROUTER_INITS`): zeros, normal(0, router_std), or hidden: k-means centroids of that layer's MLP
inputs on a calibration text set (mergekit's "hidden" gate initialisation, done with clustering).

What is preserved exactly (fp32, eval mode, no capacity limit): with `copy` and a router whose top-k weights sum
to 1 (topk_softmax with norm_topk_prob, noisy_topk in eval, sigmoid_grouped with routed_scaling_factor 1), each MoE
layer computes sum_k w_k FFN(x) = FFN(x), so the logits equal the dense model's whatever the router weights. The
same holds for `neuron_split` when k = E and the router is zero (w = 1 / E, down scaled by E), and for
`shared_expert` with copy experts. Switch routing (k = 1, weight = router probability p, not renormalised)
gives p(x) * FFN(x) per MoE layer: the logits change. Drop-Upcycling and noise change the function on purpose.

Memory: the conversion reads one tensor set at a time from the dense safetensors shards (`safe_open`, one file
open at a time) and writes one output shard per unit (embeddings/head, then one per decoder layer) with a
`model.safetensors.index.json`, so the peak is about one dense layer plus one upcycled layer, never the whole
model times E (see bench/bench_upcycle_memory.py). Only `router_init="hidden"` loads the dense model once, to run
the calibration text, before the streaming conversion starts.

The modules, bottom up (none of them travels to the Hub):
    options       `UpcycleOptions` and its validation, `UpcyclingError`, the per-layer seed
    families      dense-family detection and the dense config -> `MoeConfig` map
    checkpoint    the dense key map and the tensor sources (state dict, safetensors shards)
    clustering    k-means++ seeding, balanced k-means, spherical k-means
    expert_init   copy, noise, Drop-Upcycling, neuron split, shared expert
    router_init   zeros, normal, hidden-state k-means on calibration text; the degenerate-router warning
    streaming     the plan, the shard writer, the side files (config, modeling files, tokenizer, model card)
    api           `upcycle` and `upcycle_to_folder`
"""

from .api import upcycle, upcycle_to_folder
from .checkpoint import KEY_MAP
from .clustering import balanced_kmeans, spherical_kmeans
from .expert_init import (
    DenseFFN,
    add_noise,
    copy_experts,
    drop_upcycle_experts,
    neuron_partition,
    neuron_split_experts,
)
from .families import SUPPORTED_FAMILIES, moe_config_from_dense
from .options import (
    EXPERT_INIT_NAMES,
    ROUTER_INIT_NAMES,
    SPLIT_MODES,
    UpcycleOptions,
    UpcyclingError,
    resolve_moe_layers,
)
from .router_init import (
    DegenerateRouterWarning,
    degenerate_router_pairs,
    hidden_state_router,
    normal_router,
    zeros_router,
)
from .streaming import MOE_LAYER_KEYS

__all__ = [
    "EXPERT_INIT_NAMES",
    "KEY_MAP",
    "MOE_LAYER_KEYS",
    "ROUTER_INIT_NAMES",
    "SPLIT_MODES",
    "SUPPORTED_FAMILIES",
    "DegenerateRouterWarning",
    "DenseFFN",
    "UpcycleOptions",
    "UpcyclingError",
    "add_noise",
    "balanced_kmeans",
    "copy_experts",
    "degenerate_router_pairs",
    "drop_upcycle_experts",
    "hidden_state_router",
    "moe_config_from_dense",
    "neuron_partition",
    "neuron_split_experts",
    "normal_router",
    "resolve_moe_layers",
    "spherical_kmeans",
    "upcycle",
    "upcycle_to_folder",
    "zeros_router",
]
