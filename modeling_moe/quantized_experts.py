"""Weight-only quantized experts: int8 per output channel, or int4 per group, dequantized on the fly.

The 3-D expert parameters are most of an MoE's weights, and transformers' `nn.Linear`-based quantizers (torchao,
bitsandbytes, ...) do not reach them. This file quantizes them in place of `experts.MoeExperts`, behind the same
call `experts(x_TD, indices_TK, weights_TK)`; everything else (attention, routers, shared experts, norms, head)
keeps its dtype. The scheme is recorded in `config.expert_quantization`, so a saved folder (safetensors: integer
weights + float32 scales) builds `QuantizedMoeExperts` again when it loads, with or without this package.

Schemes (symmetric, round to nearest, zero point 0), for a weight row w (one output channel, length D_in):
    {"bits": 8}                      q = round(w / s) in [-127, 127], s = max|w| / 127 per output channel.
                                     Stored int8, shape of the float weight; scale (E, O) float32.
    {"bits": 4, "group_size": g}     per group of g consecutive inputs: q in [-7, 7], s = max|w_group| / 7.
                                     Two values per byte (uint8, low nibble first): (E, O, D_in / 2);
                                     scale (E, O, D_in / g) float32. g must be even and divide D and I.
Dequantized weight: w_hat = q * s (float32, then the activations' dtype). The scales follow the model's float
dtype when the model is cast (`.to(torch.bfloat16)`, `from_pretrained(..., dtype=torch.bfloat16)`); the product
is still taken in float32.

Shape legend: T tokens, D hidden size, I expert intermediate size, E experts, K experts per token,
O output features of one projection (2I for gate_up, D for down), G groups per row.

Compute: per hit expert, its tokens' rows run gate_up -> SwiGLU -> down and are added, times their routing weights,
into the (T, D) output (accumulated in float32), as in `experts.grouped_experts_forward`; the sentinel index E
(a dropped assignment) is never computed. A projection on at most `FUSED_ROWS` rows without autograd, int8, on
the CPU, runs torch's weight-only kernel `torch._weight_int8pack_mm` (reads the int8 weights, no float copy);
anything else dequantizes that expert's weight and runs one GEMM (`_DequantLinear`: its backward gives the input
gradient from the integer weights again, so training on top of frozen quantized experts keeps no float copy).
Only the input and the routing weights get gradients: quantized weights are frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

SUPPORTED_BITS = (8, 4)
# At most this many rows per expert projection run torch's fused int8 weight-only kernel (decode-sized inputs);
# above it, dequantize + one GEMM is faster on the CPU (the kernel is a GEMV loop there).
FUSED_ROWS = 4
_QMAX = {8: 127, 4: 7}


class QuantizationError(ValueError):
    """A quantization request that cannot be honoured; the message names the argument or field."""


def check_expert_quantization(spec, hidden_size: int, moe_intermediate_size: int) -> dict:
    """Validate an `expert_quantization` spec against the expert shapes and return it normalised.

    Allowed: {"bits": 8} (per output channel) or {"bits": 4, "group_size": g}, g an even integer dividing
    hidden_size and moe_intermediate_size. Raises QuantizationError naming the offending key otherwise.
    """
    if not isinstance(spec, dict):
        raise QuantizationError(f"expert_quantization must be None or a dict like {{'bits': 8}}, got {spec!r}")
    unknown = set(spec) - {"bits", "group_size"}
    if unknown:
        raise QuantizationError(f"expert_quantization has unknown keys {sorted(unknown)}; allowed: bits, group_size")
    bits, group_size = spec.get("bits"), spec.get("group_size")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise QuantizationError(f"expert_quantization bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if bits == 8:
        if group_size is not None:
            raise QuantizationError(
                f"expert_quantization group_size must be None with bits=8 (one scale per output channel), "
                f"got {group_size!r}"
            )
        return {"bits": 8}
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise QuantizationError(
            f"expert_quantization group_size must be an even integer >= 2 with bits=4, got {group_size!r}"
        )
    for name, size in (("hidden_size", hidden_size), ("moe_intermediate_size", moe_intermediate_size)):
        if size % group_size:
            raise QuantizationError(f"expert_quantization group_size {group_size} must divide {name} ({size})")
    return {"bits": 4, "group_size": group_size}


# ------------------------------------------------------------------ quantize / dequantize
def quantize_weight(w_EOD: torch.Tensor, bits: int, group_size: int | None = None):
    """Float (E, O, D_in) weights -> (q, scale) in the layout of the module docstring."""
    qmax = _QMAX[bits]
    w = w_EOD.detach().float()
    E, O, D_in = w.shape
    if bits == 8:
        scale_EO = w.abs().amax(dim=-1).div(qmax)  # per output channel
        q = torch.round(w / _safe(scale_EO).unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
        return q, scale_EO
    w_EOGg = w.view(E, O, D_in // group_size, group_size)
    scale_EOG = w_EOGg.abs().amax(dim=-1).div(qmax)  # per group
    q = torch.round(w_EOGg / _safe(scale_EOG).unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8).view(E, O, D_in)
    return _pack_int4(q), scale_EOG


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """(q, scale) of any leading shape (..., O, D_in or D_in / 2) -> float weights (..., O, D_in) in `dtype`.

    w_hat = q * s, computed in float32 and rounded once to `dtype`."""
    if bits == 8:
        return (q.float() * scale.float().unsqueeze(-1)).to(dtype)
    values = _unpack_int4(q).float()  # (..., O, D_in)
    groups = scale.shape[-1]
    w = values.unflatten(-1, (groups, values.shape[-1] // groups)) * scale.float().unsqueeze(-1)
    return w.flatten(-2).to(dtype)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """All-zero rows / groups have scale 0 and quantize to 0: divide by 1 there instead."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], (..., D_in) -> uint8 (..., D_in / 2): element 2j in the low nibble, 2j+1 high."""
    nibbles = (q & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., D_in / 2) -> int8 (..., D_in) values in [-8, 7] (the inverse of `_pack_int4`)."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    values = torch.stack((low, high), dim=-1).flatten(-2)
    return (values ^ 8) - 8  # sign-extend the 4-bit two's complement


# ------------------------------------------------------------------ compute
class _DequantLinear(torch.autograd.Function):
    """y = x @ w_hat^T with w_hat = dequantize(q, scale); the backward recomputes w_hat (nothing float is saved)
    and returns the input gradient only (quantized weights are frozen)."""

    @staticmethod
    def forward(ctx, x_nD, q, scale, bits):
        ctx.save_for_backward(q, scale)
        ctx.bits = bits
        return F.linear(x_nD, dequantize_weight(q, scale, bits, x_nD.dtype))

    @staticmethod
    def backward(ctx, dy_nO):
        q, scale = ctx.saved_tensors
        return dy_nO @ dequantize_weight(q, scale, ctx.bits, dy_nO.dtype), None, None, None


def quantized_linear(x_nD, q_OD, scale_O, bits: int, bias_O: torch.Tensor | None = None) -> torch.Tensor:
    """x_nD (n, D_in) @ dequantize(q_OD, scale_O)^T (+ bias) -> (n, O), in x's dtype."""
    fused = (
        bits == 8
        and x_nD.device.type == "cpu"
        and x_nD.shape[0] <= FUSED_ROWS
        and x_nD.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not (torch.is_grad_enabled() and x_nD.requires_grad)
    )
    if fused:  # torch's weight-only int8 kernel: (x @ q^T) * s, reading int8 weights
        y_nO = torch._weight_int8pack_mm(x_nD.contiguous(), q_OD, scale_O.to(x_nD.dtype))
    else:
        y_nO = _DequantLinear.apply(x_nD, q_OD, scale_O, bits)
    return y_nO + bias_O if bias_O is not None else y_nO


def quantized_experts_forward(
    x_TD: torch.Tensor,
    experts: QuantizedMoeExperts,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
) -> torch.Tensor:
    """y_TD = sum_k weights_TK[:, k] * expert_{indices_TK[:, k]}(x_TD) with quantized expert weights; the sentinel
    index E (dropped) is skipped. Same contract as `experts.experts_forward`."""
    T, D = x_TD.shape
    K = indices_TK.shape[1]
    E, I, bits = experts.num_experts, experts.intermediate_dim, experts.bits
    acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)  # one rounding per token for 16-bit inputs
    flat_expert_N = indices_TK.reshape(-1)
    order_N = torch.argsort(flat_expert_N, stable=True)  # grouped by expert; the sentinel E sorts last
    counts = torch.bincount(flat_expert_N, minlength=E + 1)[:E].tolist()
    weight_N1 = weights_TK.reshape(-1).index_select(0, order_N).unsqueeze(-1).to(acc_dtype)
    y_TD = x_TD.new_zeros(T, D, dtype=acc_dtype)
    b1, b2 = experts.gate_up_proj_bias, experts.down_proj_bias
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        end = start + n
        tokens = order_N[start:end] // K
        x_nD = x_TD.index_select(0, tokens)
        gu = quantized_linear(
            x_nD, experts.gate_up_proj[e], experts.gate_up_proj_scale[e], bits, b1[e] if b1 is not None else None
        )  # (n, 2I)
        h = experts.act_fn(gu[:, :I]) * gu[:, I:]  # SwiGLU (Shazeer 2020, Eq. 6), (n, I)
        y = quantized_linear(
            h, experts.down_proj[e], experts.down_proj_scale[e], bits, b2[e] if b2 is not None else None
        )
        # combine: y_t += w_tk * expert(x_t) (Shazeer et al. 2017, Eq. 1)
        y_TD = y_TD.index_add(0, tokens, y.to(acc_dtype) * weight_N1[start:end])
        start = end
    return y_TD.to(x_TD.dtype)


# ------------------------------------------------------------------ module
class QuantizedMoeExperts(nn.Module):
    """`MoeExperts` with weight-only quantized weights (the scheme of `config.expert_quantization`).

    Parameters (frozen, integer): gate_up_proj int8 (E, 2I, D) or, int4, uint8 (E, 2I, D/2); down_proj int8
    (E, D, I) or uint8 (E, D, I/2). Buffers (float32, saved): gate_up_proj_scale (E, 2I) or (E, 2I, D/g),
    down_proj_scale (E, D) or (E, D, I/g). Biases (mlp_bias) stay float parameters. The integer weights are
    `nn.Parameter`s so that parameter counts and device placement treat them as weights.
    """

    def __init__(self, config) -> None:
        super().__init__()
        spec = check_expert_quantization(config.expert_quantization, config.hidden_size, config.moe_intermediate_size)
        self.bits, self.group_size = spec["bits"], spec.get("group_size")
        self.num_experts = E = config.num_local_experts
        self.hidden_dim = D = config.hidden_size
        self.intermediate_dim = I = config.moe_intermediate_size
        pack = 8 // self.bits  # values per stored element
        qdtype = torch.int8 if self.bits == 8 else torch.uint8
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, D // pack, dtype=qdtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.zeros(E, D, I // pack, dtype=qdtype), requires_grad=False)
        groups = () if self.bits == 8 else (D // self.group_size,)
        down_groups = () if self.bits == 8 else (I // self.group_size,)
        self.register_buffer("gate_up_proj_scale", torch.zeros(E, 2 * I, *groups))
        self.register_buffer("down_proj_scale", torch.zeros(E, D, *down_groups))
        if config.mlp_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
            self.down_proj_bias = nn.Parameter(torch.zeros(E, D))
        else:
            self.gate_up_proj_bias = None
            self.down_proj_bias = None
        self.act_fn = ACT2FN[config.hidden_act]

    @property
    def values_per_element(self) -> int:
        """Quantized values per stored element of the integer weights (2 for packed int4): parameter counts
        multiply `numel()` by this."""
        return 8 // self.bits

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """(T, D) tokens, (T, K) expert indices (E = dropped), (T, K) weights -> (T, D) combined expert output."""
        return quantized_experts_forward(x_TD, self, indices_TK, weights_TK)

    @torch.no_grad()
    def load_float_weights(self, gate_up_EHD: torch.Tensor, down_EDI: torch.Tensor) -> None:
        """Quantize float (E, 2I, D) and (E, D, I) expert weights into this module."""
        for name, w in (("gate_up_proj", gate_up_EHD), ("down_proj", down_EDI)):
            q, scale = quantize_weight(w, self.bits, self.group_size)
            getattr(self, name).copy_(q)
            getattr(self, name + "_scale").copy_(scale)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantized (E, 2I, D) and (E, D, I) weights (for references and inspection)."""
        return (
            dequantize_weight(self.gate_up_proj, self.gate_up_proj_scale, self.bits, dtype),
            dequantize_weight(self.down_proj, self.down_proj_scale, self.bits, dtype),
        )

    def extra_repr(self) -> str:
        scheme = "int8 per channel" if self.bits == 8 else f"int4 group {self.group_size}"
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, {scheme}"
        )


# ------------------------------------------------------------------ the user's entry point
QUANTIZATION_NAMES = {"int8": 8, "int4": 4}


def quantize_experts(model: nn.Module, dtype: str = "int8", group_size: int | None = None) -> nn.Module:
    """Quantize every routed expert of `model` (a `MoeForCausalLM` / `MoeModel` of this repository) in place.

    Args:
        model: the model; its experts must be float (`MoeExperts`). Attention, routers, shared experts, norms,
            embeddings and the head keep their dtype.
        dtype: "int8" (symmetric, one scale per output channel) or "int4" (symmetric, one scale per group).
        group_size: int4 only, required: inputs per scale group (even, divides hidden_size and
            moe_intermediate_size; 32, 64 or 128 are usual). Must be None for int8.
    Returns:
        The same model, with `config.expert_quantization` set so that `save_pretrained` writes a folder that
        reloads quantized (`from_pretrained`, also with `trust_remote_code` and without this package).
    Raises:
        QuantizationError: unsupported dtype, bad group size, experts already quantized, or no experts.
    """
    if dtype not in QUANTIZATION_NAMES:
        raise QuantizationError(f"quantize_experts dtype must be one of {sorted(QUANTIZATION_NAMES)}, got {dtype!r}")
    config = model.config
    if getattr(config, "expert_quantization", None) is not None:
        raise QuantizationError(f"the experts are already quantized: expert_quantization={config.expert_quantization}")
    spec = {"bits": QUANTIZATION_NAMES[dtype]}
    if group_size is not None or spec["bits"] == 4:
        spec["group_size"] = group_size
    spec = check_expert_quantization(spec, config.hidden_size, config.moe_intermediate_size)
    targets = [(name, m) for name, m in model.named_modules() if name.endswith("mlp.experts")]
    if not targets:
        raise QuantizationError(f"{type(model).__name__} has no routed experts (modules named '*.mlp.experts')")
    for name, module in targets:
        if not all(p.is_floating_point() for p in (module.gate_up_proj, module.down_proj)):
            raise QuantizationError(f"{name} holds non-float expert weights: already quantized?")
    config.expert_quantization = spec
    for name, module in targets:
        quantized = QuantizedMoeExperts(config).to(module.gate_up_proj.device)
        quantized.load_float_weights(module.gate_up_proj, module.down_proj)
        if module.gate_up_proj_bias is not None:  # biases stay float, in their own dtype
            quantized.gate_up_proj_bias = nn.Parameter(module.gate_up_proj_bias.detach().clone())
            quantized.down_proj_bias = nn.Parameter(module.down_proj_bias.detach().clone())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)
    return model


__all__ = [
    "FUSED_ROWS",
    "QuantizationError",
    "QuantizedMoeExperts",
    "check_expert_quantization",
    "dequantize_weight",
    "quantize_experts",
    "quantize_weight",
    "quantized_experts_forward",
    "quantized_linear",
]
