"""LoRA for timm vision models: layers, target resolution, injection, merging and parameter budgets."""

from lora_vision.lora.adapter import Conv2dAdapter, LinearAdapter, LoraAdapter
from lora_vision.lora.config import LoraConfig
from lora_vision.lora.errors import LoRAConfigError
from lora_vision.lora.heads import AdapterHeads
from lora_vision.lora.inject import (
    apply_lora,
    delete_adapter,
    freeze_backbone,
    lora_layers,
    merge_and_unload,
    merge_lora,
    named_lora_layers,
    set_active_adapters,
    transfer_adapters,
    unmerge_lora,
)
from lora_vision.lora.layers import (
    DEFAULT_ADAPTER,
    AdapterNameError,
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    state_dict_key,
)
from lora_vision.lora.routing import RoutingError, forward_routed, model_adapter_names, route
from lora_vision.lora.summary import AdaptedLayer, ParameterSummary, summarize
from lora_vision.lora.targets import PRESETS, classifier_name, resolve_targets

__all__ = [
    "DEFAULT_ADAPTER",
    "PRESETS",
    "AdaptedLayer",
    "AdapterHeads",
    "AdapterNameError",
    "Conv2dAdapter",
    "LinearAdapter",
    "LoRAConfigError",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "LoraAdapter",
    "LoraConfig",
    "ParameterSummary",
    "RoutingError",
    "apply_lora",
    "classifier_name",
    "delete_adapter",
    "forward_routed",
    "freeze_backbone",
    "lora_layers",
    "merge_and_unload",
    "merge_lora",
    "model_adapter_names",
    "named_lora_layers",
    "resolve_targets",
    "route",
    "set_active_adapters",
    "state_dict_key",
    "summarize",
    "transfer_adapters",
    "unmerge_lora",
]
