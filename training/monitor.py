"""`RouterMonitorCallback`: per-MoE-layer routing health in any `Trainer`'s normal logs.

At every logging step it adds, for each MoE layer L (the decoder layer index), over the training forwards since
the previous log (the logging window):

    router/layer_L/load_expert_e     fraction of the layer's routed assignments that expert e ran
    router/layer_L/load_cv           coefficient of variation of that load (0 = balanced)
    router/layer_L/router_entropy    mean entropy (nats) of the softmax router distribution per token
    router/layer_L/dropped_fraction  assignments dropped by the capacity limit / assignments made
    router/layer_L/aux_loss          Switch/GShard balancing loss of this layer alone (unweighted)
    router/layer_L/z_loss            ST-MoE router z-loss of this layer alone (unweighted)
    router/layer_L/dead_experts      experts that received no token in the window
    router/dead_experts              the sum over layers

Every statistic comes from `modeling_moe.routing_stats` (a `RoutingAccumulator` per window) and the losses from
`modeling_moe.losses`; nothing is recomputed here. At the end of training it writes
`router_load_heatmap.png` (expert load per layer over the logging steps) and `router_monitor.json` to
`args.output_dir`.

How the routing is captured: a forward hook on the model's base `MoeModel` (the module whose output recorder
collects `router_indices`), asking it for dropped-token counts too. That module runs once per forward of the
whole model, so
  * gradient accumulation: every micro-batch is counted once;
  * gradient checkpointing: the recomputation in backward re-runs decoder layers, never `MoeModel.forward`, so
    nothing is counted twice (the same reason the model's own aux-free load counting uses recorded outputs);
  * only training forwards count: the module is in train mode and autograd is on. Evaluation and extra no-grad
    forwards (e.g. a reference forward for a routing-consistency loss) are ignored.
Under `torch.distributed` the window is summed over processes before the summary, so every rank logs the
global numbers.

Trainer puts its default and `report_to` callbacks (TensorBoard, W&B, the printer) before user callbacks, and
all of them read the `logs` dict in `on_log`. Install with `RouterMonitorCallback.attach(trainer)` so that the
monitor runs first and every reporter sees its numbers. `Trainer(callbacks=[RouterMonitorCallback()])` works
too, but then only `state.log_history` and callbacks after it get them (a warning says so when reporters are
configured).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import TrainerCallback

from modeling_moe.losses import load_balancing_loss, router_z_loss
from modeling_moe.routing_stats import RoutingAccumulator

logger = logging.getLogger(__name__)

PREFIX = "router"
HEATMAP_FILE = "router_load_heatmap.png"
HISTORY_FILE = "router_monitor.json"


def find_moe_base_model(model: nn.Module) -> nn.Module:
    """The innermost module of `model` (peft / DDP wrappers included) whose output recorder collects
    `router_indices`: our `MoeModel`, also when it was loaded with trust_remote_code.

    Raises:
        ValueError: `model` contains no such module (not a mixture-of-experts model of this repository).
    """
    found = None
    for module in model.modules():
        recordable = getattr(type(module), "_can_record_outputs", None) or {}
        if "router_indices" in recordable and hasattr(module, "layers"):
            found = module
    if found is None:
        raise ValueError(
            f"{type(model).__name__} has no MoE base model that records router_indices; RouterMonitorCallback "
            "works with modeling_moe models (MoeForCausalLM, also under peft or trust_remote_code)"
        )
    return found


class RouterMonitorCallback(TrainerCallback):
    """Logs per-layer routing statistics at every logging step and saves a load heatmap at the end.

    Args:
        log_expert_loads: log one `load_expert_e` scalar per expert (turn off for hundreds of experts).
        save_plots: write the heatmap PNG and the JSON history to `args.output_dir` at train end.
        prefix: first component of every logged key.
    Attributes:
        history: one entry per logging step: {"step", "layers": [summary dict per MoE layer]} where each
            summary is `RoutingAccumulator.summary()` plus "layer", "aux_loss", "z_loss", "tokens".
    """

    def __init__(self, log_expert_loads: bool = True, save_plots: bool = True, prefix: str = PREFIX) -> None:
        self.log_expert_loads = log_expert_loads
        self.save_plots = save_plots
        self.prefix = prefix
        self.history: list[dict] = []
        self.attached_first = False
        self._handles: list = []
        self._base: nn.Module | None = None
        self._acc: RoutingAccumulator | None = None
        self._loss_sums: list[list[float]] = []  # per layer [aux * tokens, z * tokens]
        self._recording = False
        self._warned_order = False

    # ------------------------------------------------------------------ installation
    @classmethod
    def attach(cls, trainer, **kwargs) -> RouterMonitorCallback:
        """Create a monitor and put it first in `trainer`'s callbacks, so that the reporters see its logs."""
        monitor = cls(**kwargs)
        monitor.attached_first = True
        trainer.callback_handler.callbacks.insert(0, monitor)
        return monitor

    def install(self, model: nn.Module) -> None:
        """Register the hooks on `model`'s MoE base model (done by `on_train_begin`; call it for plain loops)."""
        self.remove()
        base = find_moe_base_model(model)
        config = base.config
        self._base = base
        self._layers = list(config.moe_layers)
        self._acc = RoutingAccumulator.for_config(config)
        self._handles = [
            base.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            base.register_forward_hook(self._post_hook, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self._recording = module.training and torch.is_grad_enabled()
        if not self._recording:
            return None
        kwargs = {**kwargs, "output_router_logits": True, "output_router_indices": True, "output_dropped_tokens": True}
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not self._recording:
            return
        self._recording = False
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.record(output.router_logits, output.router_indices, output.dropped_tokens, mask)

    def record(self, router_logits, router_indices, dropped_tokens, attention_mask: torch.Tensor | None) -> None:
        """Add one forward pass's routing (one entry per MoE layer) to the window."""
        logits = tuple(t.detach() for t in router_logits)
        outputs = SimpleNamespace(
            router_logits=logits, router_indices=router_indices, dropped_tokens=dropped_tokens, logits=None
        )
        tokens_before = self._acc.real_tokens
        self._acc.update(outputs, attention_mask)
        n = self._acc.real_tokens - tokens_before
        config = self._base.config
        if not self._loss_sums:
            self._loss_sums = [[0.0, 0.0] for _ in logits]
        with torch.no_grad():
            for layer, logits_TE in enumerate(logits):
                aux = load_balancing_loss(
                    [logits_TE], config.num_local_experts, config.num_experts_per_tok, attention_mask
                )
                self._loss_sums[layer][0] += float(aux) * n
                self._loss_sums[layer][1] += float(router_z_loss([logits_TE], attention_mask)) * n

    # ------------------------------------------------------------------ window
    def _all_reduce_window(self) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        acc = self._acc
        layers = len(acc.counts)
        flat = torch.cat(
            [
                torch.stack(acc.counts).reshape(-1),
                torch.stack(acc.mass).reshape(-1),
                torch.tensor(acc.dropped + acc.entropy_sum + acc.top1_sum + acc.margin_sum, dtype=torch.float64),
                torch.tensor([x for pair in self._loss_sums for x in pair], dtype=torch.float64),
                torch.tensor([float(acc.real_tokens)], dtype=torch.float64),
            ]
        )
        torch.distributed.all_reduce(flat)
        E = acc.num_experts
        acc.counts = list(flat[: layers * E].view(layers, E).clone())
        acc.mass = list(flat[layers * E : 2 * layers * E].view(layers, E).clone())
        rest = flat[2 * layers * E :].tolist()
        acc.dropped, acc.entropy_sum = rest[:layers], rest[layers : 2 * layers]
        acc.top1_sum, acc.margin_sum = rest[2 * layers : 3 * layers], rest[3 * layers : 4 * layers]
        pairs = rest[4 * layers : 6 * layers]
        self._loss_sums = [[pairs[2 * i], pairs[2 * i + 1]] for i in range(layers)]
        acc.real_tokens = int(rest[-1])

    def flush(self) -> list[dict] | None:
        """Summarise the window (summed over processes), start a new one. None when nothing was recorded."""
        if self._acc is None or not self._acc.counts:
            return None
        self._all_reduce_window()
        n = max(self._acc.real_tokens, 1)
        summary = self._acc.summary()
        for i, layer in enumerate(summary):
            layer["layer"] = self._layers[i]
            layer["aux_loss"] = self._loss_sums[i][0] / n
            layer["z_loss"] = self._loss_sums[i][1] / n
            layer["tokens"] = self._acc.real_tokens
        self._acc.reset()
        self._loss_sums = []
        return summary

    def metrics(self, summary: list[dict]) -> dict[str, float]:
        """Flat scalar log entries (see the module docstring) from a `flush()` summary."""
        out: dict[str, float] = {}
        for layer in summary:
            key = f"{self.prefix}/layer_{layer['layer']}"
            if self.log_expert_loads:
                for e, fraction in enumerate(layer["load"]):
                    out[f"{key}/load_expert_{e}"] = fraction
            out[f"{key}/load_cv"] = layer["load_cv"]
            out[f"{key}/router_entropy"] = layer["router_entropy"]
            out[f"{key}/dropped_fraction"] = layer["dropped_fraction"]
            out[f"{key}/aux_loss"] = layer["aux_loss"]
            out[f"{key}/z_loss"] = layer["z_loss"]
            out[f"{key}/dead_experts"] = len(layer["dead_experts"])
        out[f"{self.prefix}/dead_experts"] = sum(len(layer["dead_experts"]) for layer in summary)
        return out

    # ------------------------------------------------------------------ TrainerCallback events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.install(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        summary = self.flush()
        if summary is None:
            return
        metrics = self.metrics(summary)
        self.history.append({"step": state.global_step, "layers": summary})
        if logs is not None:
            logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        reporters = [r for r in (args.report_to or []) if r != "none"]
        if reporters and not self.attached_first and not self._warned_order:
            self._warned_order = True
            logger.warning(
                "RouterMonitorCallback runs after the report_to callbacks %s, which therefore miss its metrics; "
                "install it with RouterMonitorCallback.attach(trainer)",
                reporters,
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.remove()
        if self.save_plots and self.history and state.is_world_process_zero:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            save_load_heatmap(self.history, out / HEATMAP_FILE)
            (out / HISTORY_FILE).write_text(json.dumps(self.history, indent=1))


def save_load_heatmap(history: list[dict], path: str | Path) -> Path:
    """One heatmap per MoE layer: expert (rows) x logging step (columns), colour = load fraction.

    A perfectly balanced layer is one flat colour (1/E); a dead expert is a dark row. Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history]
    layers = history[0]["layers"]
    num_experts = len(layers[0]["load"])
    fig, axes = plt.subplots(
        len(layers), 1, figsize=(max(6.0, 0.25 * len(steps) + 3), 1.2 + 0.35 * num_experts * len(layers)), squeeze=False
    )
    vmax = max(max(max(layer["load"]) for layer in entry["layers"]) for entry in history) or 1.0
    for i, layer in enumerate(layers):
        ax = axes[i][0]
        grid = torch.tensor([entry["layers"][i]["load"] for entry in history]).T.numpy()
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"MoE layer {layer['layer']}: expert load fraction (balanced = {1 / num_experts:.3f})", fontsize=9)
        ax.set_ylabel("expert")
        ax.set_yticks(range(num_experts))
        tick_every = max(1, math.ceil(len(steps) / 12))
        ax.set_xticks(range(0, len(steps), tick_every))
        ax.set_xticklabels([str(s) for s in steps[::tick_every]], fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.03)
    axes[-1][0].set_xlabel("training step (logging window end)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["HEATMAP_FILE", "HISTORY_FILE", "RouterMonitorCallback", "find_moe_base_model", "save_load_heatmap"]
