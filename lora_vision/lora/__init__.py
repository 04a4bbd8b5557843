"""LoRA for timm vision models: layers, target resolution, injection, merging and parameter budgets."""

from lora_vision.lora.config import LoraConfig
from lora_vision.lora.errors import LoRAConfigError
from lora_vision.lora.inject import (
    apply_lora,
    freeze_backbone,
    lora_layers,
    merge_and_unload,
    merge_lora,
    named_lora_layers,
    unmerge_lora,
)
from lora_vision.lora.layers import LoRAConv2d, LoRALayer, LoRALinear
from lora_vision.lora.summary import AdaptedLayer, ParameterSummary, summarize
from lora_vision.lora.targets import PRESETS, classifier_name, resolve_targets

__all__ = [
    "PRESETS",
    "AdaptedLayer",
    "LoRAConfigError",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "LoraConfig",
    "ParameterSummary",
    "apply_lora",
    "classifier_name",
    "freeze_backbone",
    "lora_layers",
    "merge_and_unload",
    "merge_lora",
    "named_lora_layers",
    "resolve_targets",
    "summarize",
    "unmerge_lora",
]
