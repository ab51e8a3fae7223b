"""Router-stable LoRA for modeling_moe models with peft: target resolution that keeps routers out, the
routing-consistency loss, ESFT expert selection with per-expert freezing, and the routing-drift report.

What peft does with these models (peft 0.21, checked by the tests):
  * `target_modules="all-linear"` wraps every `nn.Linear` except the LM head: attention, dense MLPs, shared
    experts, and the shared-expert gate `mlp.shared_expert_gate` (a router: it decides how much of the shared
    expert each token gets). It does not wrap `mlp.router` only because `MoeRouter` is not an `nn.Linear`;
    `target_parameters=["router.weight"]` would adapt it. `lora_config()` therefore excludes every router module
    explicitly, and naming one as a target is an error unless the caller opts in.
  * The 3-D experts `mlp.experts.gate_up_proj` (E, 2I, D) and `mlp.experts.down_proj` (E, D, I) are adapted with
    `target_parameters` (`lora.ParamWrapper`): one rank-r pair per expert, stored stacked. lora_A has shape
    (E*r, in) with expert e in rows [e*r, (e+1)*r); lora_B has shape (out, E*r) with expert e in columns
    e, E+e, 2E+e, ... (peft reshapes it to (out, r, E)). So LoRA can be restricted per expert by masking those
    slices, which is how ESFT is done here (`ExpertSliceFreezer`).
  * `target_parameters` do not support `lora_dropout`.

The drift report uses `modeling_moe.routing_stats` (top-k agreement and KL); the routing-consistency loss is
the differentiable counterpart of `routing_stats.routing_kl`, for training.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from modeling_moe.routing_stats import RoutingAccumulator, load_fractions, routing_kl, topk_agreement

# Module names (suffixes) that route tokens: the MoE router and the shared-expert gate.
ROUTER_MODULE_SUFFIXES = ("mlp.router", "mlp.shared_expert_gate")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")  # dense FFN layers and shared experts
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


class LoraTargetError(ValueError):
    """A LoRA target is invalid (matches nothing, or names a router without the opt-in)."""


# ------------------------------------------------------------------ names
def _matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the full name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def is_router_name(name: str) -> bool:
    """True for a router module name, or a parameter / buffer name inside one."""
    return any(f"{suffix}." in name + "." for suffix in ROUTER_MODULE_SUFFIXES)


def router_module_names(model: nn.Module) -> list[str]:
    """Names of the router modules of `model` (MoE routers and shared-expert gates)."""
    return [n for n, _ in model.named_modules() if n and any(_matches(n, s) for s in ROUTER_MODULE_SUFFIXES)]


def router_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every router parameter and buffer (weights, noise weights, aux-free bias), keyed by name without
    peft's wrapper prefixes, for bitwise comparison before / after fine-tuning."""
    state = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if is_router_name(name) and "load_counts" not in name:
            state[_canonical(name)] = tensor.detach().clone()
    return state


def _canonical(name: str) -> str:
    name = name.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")
    return re.sub(r"\.modules_to_save\.[^.]+", "", name)


def changed_router_tensors(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Names of router tensors whose current value differs bitwise from `before` (or disappeared)."""
    after = router_state(model)
    return [name for name, t in before.items() if name not in after or not torch.equal(t, after[name])]


# ------------------------------------------------------------------ targets
@dataclass
class LoraTargets:
    """Resolved LoRA targets: peft `target_modules` (a list, "all-linear" or None) and `target_parameters`."""

    modules: list[str] | str | None
    parameters: list[str]
    wrapped_modules: list[str]
    wrapped_parameters: list[str]


def default_module_targets(model: nn.Module) -> list[str]:
    """Attention projections plus dense-MLP / shared-expert projections, those that exist in `model`."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [t for t in (*ATTENTION_MODULES, *MLP_MODULES) if any(_matches(n, t) for n in linear)]


def resolve_lora_targets(
    model: nn.Module,
    target_modules: Sequence[str] | str | None,
    target_parameters: Sequence[str],
    allow_routers: bool = False,
) -> LoraTargets:
    """Check the requested LoRA targets against `model` before anything is wrapped.

    Args:
        target_modules: module-name suffixes, "all-linear", or None / [] for none.
        target_parameters: parameter-name suffixes (2-D or 3-D parameters, e.g. the experts).
        allow_routers: the explicit opt-in for routers as targets.
    Returns:
        LoraTargets with the names each entry matched.
    Raises:
        LoraTargetError: an entry matches nothing; an entry matches a router and `allow_routers` is False;
            a router module entry names a `MoeRouter` (not an nn.Linear: use its parameter); nothing is targeted.
    """
    modules = dict(model.named_modules())
    linear = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    wrapped_modules: list[str] = []
    if target_modules == "all-linear":
        head = {n for n, m in modules.items() if m is model.get_output_embeddings()}
        wrapped_modules = sorted(n for n in linear - head if not is_router_name(n + "."))
        if allow_routers:
            wrapped_modules = sorted(linear - head)
    elif target_modules:
        for entry in target_modules:
            hits = [n for n in modules if n and _matches(n, entry)]
            if not hits:
                raise LoraTargetError(
                    f"--lora_target_modules entry {entry!r} matches no module; linear modules end in "
                    f"{sorted({n.rsplit('.', 1)[-1] for n in linear})}"
                )
            routers = [n for n in hits if is_router_name(n + ".")]
            if routers and not allow_routers:
                raise LoraTargetError(
                    f"--lora_target_modules entry {entry!r} names router modules ({routers[:3]}...); routers stay "
                    "frozen and unwrapped by default. Pass --lora_routers to adapt them anyway"
                )
            not_linear = [n for n in hits if n not in linear]
            if not_linear:
                raise LoraTargetError(
                    f"--lora_target_modules entry {entry!r} matches modules that are not nn.Linear ({not_linear[:3]}); "
                    "adapt a router's weight with --lora_target_parameters mlp.router.weight, and 3-D experts with "
                    f"--lora_target_parameters {','.join(EXPERT_PARAMETERS)}"
                )
            wrapped_modules += hits
    params = dict(model.named_parameters())
    wrapped_parameters: list[str] = []
    for entry in target_parameters:
        hits = [n for n in params if _matches(n, entry)]
        if not hits:
            raise LoraTargetError(
                f"--lora_target_parameters entry {entry!r} matches no parameter; expert parameters end in "
                f"{list(EXPERT_PARAMETERS)}"
            )
        routers = [n for n in hits if is_router_name(n)]
        if routers and not allow_routers:
            raise LoraTargetError(
                f"--lora_target_parameters entry {entry!r} names router parameters ({routers[:3]}...); routers stay "
                "frozen by default. Pass --lora_routers to adapt them anyway"
            )
        quantized = [n for n in hits if not params[n].is_floating_point()]
        if quantized:
            raise LoraTargetError(
                f"--lora_target_parameters entry {entry!r} matches quantized (integer) expert weights "
                f"({quantized[:3]}...): LoRA cannot adapt them. Pass --lora_target_parameters none to fine-tune "
                "the other modules on top of the frozen quantized experts"
            )
        bad = [n for n in hits if params[n].dim() not in (2, 3)]
        if bad:
            raise LoraTargetError(f"--lora_target_parameters entry {entry!r} matches non-matrix parameters {bad[:3]}")
        wrapped_parameters += hits
    if not wrapped_modules and not wrapped_parameters:
        raise LoraTargetError("no LoRA target: give --lora_target_modules and/or --lora_target_parameters")
    return LoraTargets(
        modules=target_modules if target_modules == "all-linear" else (list(target_modules) or None),
        parameters=list(target_parameters),
        wrapped_modules=sorted(set(wrapped_modules)),
        wrapped_parameters=sorted(set(wrapped_parameters)),
    )


def lora_config(
    model: nn.Module,
    targets: LoraTargets,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    allow_routers: bool = False,
    train_routers: bool = False,
) -> LoraConfig:
    """The peft `LoraConfig`: routers excluded from wrapping unless `allow_routers`; with `train_routers`, the
    routers are `modules_to_save` (a trainable copy; `disable_adapter()` still routes with the original)."""
    if dropout and targets.parameters:
        raise LoraTargetError(
            f"--lora_dropout must be 0 with --lora_target_parameters (peft's ParamWrapper has no dropout), "
            f"got {dropout}"
        )
    exclude = None
    if targets.modules == "all-linear" and not allow_routers:
        exclude = router_module_names(model) or None
    modules_to_save = ["router", "shared_expert_gate"] if train_routers else None
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets.modules or [],
        target_parameters=targets.parameters or None,
        exclude_modules=exclude,
        modules_to_save=modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainable_router_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the router parameters that require grad."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and is_router_name(n)]


# ------------------------------------------------------------------ routing-consistency loss
def routing_kl_loss(
    reference_logits: Sequence[torch.Tensor],
    current_logits: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable mean over MoE layers and real tokens of KL(p_reference || p_current) between softmax
    router distributions (the training-loss form of `routing_stats.routing_kl`; gradients flow to `current`)."""
    if not current_logits:
        return torch.zeros(())
    mask_T = None if attention_mask is None else attention_mask.reshape(-1).to(torch.float32)
    per_layer = []
    for ref_TE, cur_TE in zip(reference_logits, current_logits, strict=True):
        log_p = F.log_softmax(ref_TE.detach().float(), dim=-1)
        log_q = F.log_softmax(cur_TE.float(), dim=-1)
        kl_T = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(dim=-1)
        if mask_T is None:
            per_layer.append(kl_T.mean())
        else:
            mask_T = mask_T.to(kl_T.device)
            per_layer.append((kl_T * mask_T).sum() / mask_T.sum().clamp_min(1.0))
    return torch.stack(per_layer).mean()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ------------------------------------------------------------------ ESFT
@torch.no_grad()
def expert_routing_shares(model: nn.Module, batches: Iterable[dict]) -> list[torch.Tensor]:
    """Per MoE layer, the share of routed assignments each expert takes on `batches` (eval mode), from
    `routing_stats` (`RoutingAccumulator` counts -> `load_fractions`). Returns (E,) float64 tensors."""
    config = model.config
    acc = RoutingAccumulator.for_config(config)
    with eval_mode(model):
        for batch in batches:
            mask = batch.get("attention_mask")
            out = model(input_ids=batch["input_ids"], attention_mask=mask, output_router_logits=True)
            acc.update(out, mask)
    if not acc.counts:
        raise ValueError("ESFT expert selection saw no data")
    return [load_fractions(c) for c in acc.counts]


def select_experts(shares: Sequence[torch.Tensor], top_p: float) -> list[list[int]]:
    """ESFT selection (Wang et al. 2024): per layer, the fewest experts, by decreasing share, whose shares sum to
    at least `top_p`. Returns the sorted expert ids per MoE layer."""
    if not 0 < top_p <= 1:
        raise ValueError(f"--esft_top_p must be in (0, 1], got {top_p}")
    selected = []
    for share_E in shares:
        order = torch.argsort(share_E, descending=True, stable=True).tolist()
        chosen, total = [], 0.0
        for e in order:
            chosen.append(e)
            total += float(share_E[e])
            if total >= top_p - 1e-12:
                break
        selected.append(sorted(chosen))
    return selected


class ExpertSliceFreezer:
    """Restricts LoRA on the 3-D experts to selected experts, bitwise.

    For every expert `ParamWrapper` in MoE layer L, the lora_A rows and lora_B columns of the experts not selected
    in L get a zero gradient mask (so AdamW's moments for them stay exactly 0), and after every optimizer step
    their values are restored from a snapshot (so weight decay cannot move them). With lora_B starting at 0, the
    LoRA update of an unselected expert stays exactly 0, and merging leaves its weights bitwise unchanged.

    Args:
        model: the peft model. selected: decoder layer index -> selected experts. adapter: the adapter name.
    """

    def __init__(self, model: nn.Module, selected: dict[int, list[int]], adapter: str = "default") -> None:
        self.entries: list[tuple[str, nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._handles = []
        for name, module in model.named_modules():
            if not isinstance(module, ParamWrapper) or module.num_experts <= 1 or adapter not in module.lora_A:
                continue
            match = _LAYER_INDEX.search(name)
            layer = int(match.group(1)) if match else None
            if layer not in selected:
                continue
            E, r = module.num_experts, module.r[adapter]
            frozen = [e for e in range(E) if e not in set(selected[layer])]
            if not frozen:
                continue
            a = module.lora_A[adapter].weight  # (E*r, in): expert e = rows e*r .. (e+1)*r-1
            b = module.lora_B[adapter].weight  # (out, r*E): expert e = columns j*E + e
            mask_a = torch.ones_like(a)
            mask_b = torch.ones_like(b)
            for e in frozen:
                mask_a[e * r : (e + 1) * r] = 0
                mask_b[:, e::E] = 0
            for label, param, mask in ((f"{name}.lora_A", a, mask_a), (f"{name}.lora_B", b, mask_b)):
                self.entries.append((label, param, mask, param.detach().clone()))
                self._handles.append(param.register_hook(lambda g, m=mask: g * m))

    def restore(self) -> None:
        """Copy the frozen slices back from the snapshot (call after every optimizer step)."""
        with torch.no_grad():
            for _, param, mask, snapshot in self.entries:
                frozen = mask == 0
                param[frozen] = snapshot[frozen]

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run `restore()` after every `optimizer.step()`; returns the hook handle."""
        handle = optimizer.register_step_post_hook(lambda *_: self.restore())
        self._handles.append(handle)
        return handle

    def violations(self, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """Frozen slices whose value changed, or whose optimizer state (exp_avg / exp_avg_sq) is not zero."""
        bad = []
        for label, param, mask, snapshot in self.entries:
            frozen = mask == 0
            if not torch.equal(param.detach()[frozen], snapshot[frozen]):
                bad.append(f"{label}: value changed")
            state = optimizer.state.get(param, {}) if optimizer is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and bool(state[key][frozen].abs().sum() != 0):
                    bad.append(f"{label}: optimizer {key} not zero")
        return bad

    def remove(self) -> None:
        """Remove the gradient masks and the optimizer hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ------------------------------------------------------------------ drift report
@torch.no_grad()
def routing_drift(peft_model: nn.Module, batches: Iterable[dict]) -> dict:
    """Routing of the fine-tuned model against its base (adapters disabled) on the same held-out batches, in eval
    mode: per MoE layer the top-k agreement and the mean KL(base || tuned) of the router distributions
    (`routing_stats.topk_agreement`, `routing_stats.routing_kl`), token-weighted over batches, plus both models'
    held-out cross-entropy.

    Returns:
        {"layers": [{"layer", "topk_agreement", "kl"}], "mean_topk_agreement", "mean_kl", "tokens",
         "base_loss", "tuned_loss"}.
    """
    lm = peft_model.get_base_model()
    config = lm.config
    E = config.num_local_experts
    agree: list[float] = []
    kl: list[float] = []
    ce = {"base": 0.0, "tuned": 0.0}
    tokens = 0
    predicted = 0
    with eval_mode(peft_model):
        for batch in batches:
            mask = batch.get("attention_mask")
            kwargs = {"input_ids": batch["input_ids"], "attention_mask": mask, "output_router_logits": True}
            with peft_model.disable_adapter():
                base = peft_model(**kwargs)
            tuned = peft_model(**kwargs)
            n = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            if not agree:
                agree, kl = [0.0] * len(base.router_indices), [0.0] * len(base.router_indices)
            for i, (ib, it, lb, lt) in enumerate(
                zip(base.router_indices, tuned.router_indices, base.router_logits, tuned.router_logits)
            ):
                agree[i] += topk_agreement(ib, it, E, mask) * n
                kl[i] += routing_kl(lb, lt, mask) * n
            labels = batch["labels"][:, 1:]
            valid = int((labels != -100).sum())
            for key, out in (("base", base), ("tuned", tuned)):
                logits = out.logits[:, :-1].float()
                ce[key] += float(
                    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
                )
            tokens += n
            predicted += valid
    layers = [
        {"layer": layer, "topk_agreement": a / max(tokens, 1), "kl": k / max(tokens, 1)}
        for layer, a, k in zip(config.moe_layers, agree, kl)
    ]
    return {
        "layers": layers,
        "mean_topk_agreement": sum(x["topk_agreement"] for x in layers) / max(len(layers), 1),
        "mean_kl": sum(x["kl"] for x in layers) / max(len(layers), 1),
        "tokens": tokens,
        "base_loss": ce["base"] / max(predicted, 1),
        "tuned_loss": ce["tuned"] / max(predicted, 1),
    }


__all__ = [
    "ATTENTION_MODULES",
    "EXPERT_PARAMETERS",
    "MLP_MODULES",
    "ROUTER_MODULE_SUFFIXES",
    "ExpertSliceFreezer",
    "LoraTargetError",
    "LoraTargets",
    "changed_router_tensors",
    "default_module_targets",
    "eval_mode",
    "expert_routing_shares",
    "is_router_name",
    "lora_config",
    "resolve_lora_targets",
    "router_module_names",
    "router_state",
    "routing_drift",
    "routing_kl_loss",
    "select_experts",
    "trainable_router_parameters",
]
