"""modeling_moe: Mixtral- and Switch-style mixture-of-experts causal LMs for transformers.

Importing the package registers the classes with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and
`AutoModelForSequenceClassification` under `model_type = "moe_lm"`. The portable files (configuration_moe,
modeling_moe, routing, experts, losses) travel to the Hub with `save_pretrained`; the rest (conversion,
accounting, presets) is tooling that stays here.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .accounting import ParameterCount, count_parameters
from .configuration_moe import MoeConfig, MoeConfigError
from .losses import load_balancing_loss, router_z_loss
from .modeling_moe import MoeForCausalLM, MoeForSequenceClassification, MoeModel, MoePreTrainedModel
from .presets import load_preset, preset_names
from .quantized_experts import QuantizationError, quantize_experts
from .upcycling import DegenerateRouterWarning, UpcyclingError, upcycle, upcycle_to_folder

AutoConfig.register(MoeConfig.model_type, MoeConfig, exist_ok=True)
AutoModel.register(MoeConfig, MoeModel, exist_ok=True)
AutoModelForCausalLM.register(MoeConfig, MoeForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(MoeConfig, MoeForSequenceClassification, exist_ok=True)

__all__ = [
    "DegenerateRouterWarning",
    "MoeConfig",
    "MoeConfigError",
    "MoeForCausalLM",
    "MoeForSequenceClassification",
    "MoeModel",
    "MoePreTrainedModel",
    "ParameterCount",
    "QuantizationError",
    "UpcyclingError",
    "count_parameters",
    "load_balancing_loss",
    "load_preset",
    "preset_names",
    "quantize_experts",
    "router_z_loss",
    "upcycle",
    "upcycle_to_folder",
]
