"""Aux-loss-free balancing (DeepSeek-V3) in training loops: when and how the router biases are updated.

The bias of each router (`e_score_correction_bias`, a saved buffer) moves by `router_bias_update_rate` toward
equal load once per optimizer step, from the load counted over that step's forwards. It never changes inside
`forward`, so gradient accumulation and gradient checkpointing count every token once, and it never changes in
eval. Three ways to drive it:

    Trainer:      Trainer(..., callbacks=[RouterBiasUpdateCallback()])
    plain loop:   optimizer.step(); model.update_router_biases()          # the documented one-line call
    any optimizer: attach_router_bias_updates(model, optimizer)           # a step post-hook

Under peft / LoRA fine-tuning nothing updates the bias unless one of these is attached (the fine-tuning script
attaches it only when asked).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback


def update_router_biases(model: nn.Module) -> int:
    """Run one bias step on every router of `model` (also inside peft / DDP wrappers, and for models loaded with
    trust_remote_code, whose classes are not ours). Returns how many routers were updated."""
    updated = 0
    for module in model.modules():
        if getattr(module, "e_score_correction_bias", None) is not None and hasattr(module, "update_bias"):
            module.update_bias()
            updated += 1
    return updated


class RouterBiasUpdateCallback(TrainerCallback):
    """A `TrainerCallback` that updates the aux-loss-free router biases after every optimizer step."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            update_router_biases(model)


def attach_router_bias_updates(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Register an optimizer step post-hook that updates the router biases; returns the removable handle."""
    return optimizer.register_step_post_hook(lambda *_: update_router_biases(model))


__all__ = ["RouterBiasUpdateCallback", "attach_router_bias_updates", "update_router_biases"]
