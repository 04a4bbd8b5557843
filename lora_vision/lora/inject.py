"""Putting adapters into a model, freezing the rest, and merging them back out."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from lora_vision.lora.config import VARIANT_FIELDS, LoraConfig
from lora_vision.lora.errors import LoRAConfigError, check_hyperparameters
from lora_vision.lora.layers import QKV_SLOTS, LoRAConv2d, LoRALayer, LoRALinear
from lora_vision.lora.summary import ParameterSummary, summarize
from lora_vision.lora.targets import Target, classifier_name, resolve_patterns, resolve_targets


def _max_rank(target: Target) -> int:
    if isinstance(target.module, nn.Conv2d):
        return LoRAConv2d.max_rank(target.module)
    return LoRALinear.max_rank(target.module, 1 if target.slots is None else len(QKV_SLOTS))


def _build(target: Target, rank: int, alpha: float | None, dropout: float, variants: dict) -> LoRALayer:
    if isinstance(target.module, nn.Conv2d):
        return LoRAConv2d(target.module, rank, alpha, dropout, **variants)
    if target.slots is None:
        return LoRALinear(target.module, rank, alpha, dropout, **variants)
    slots = {"num_slots": len(QKV_SLOTS), "slots": target.slots}
    return LoRALinear(target.module, rank, alpha, dropout, **slots, **variants)


def freeze_backbone(model: nn.Module, train_head: bool = True) -> None:
    """Freeze every parameter except LoRA adapters and (if `train_head`) a non-adapted classifier head."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALayer):
            module.requires_grad_(True)
            module.base.requires_grad_(False)
    head = classifier_name(model)
    if train_head and head is not None and not isinstance(model.get_submodule(head), LoRALayer):
        model.get_submodule(head).requires_grad_(True)


def apply_lora(model: nn.Module, targets: str | Sequence[str] | LoraConfig, **settings: Any) -> ParameterSummary:
    """Add LoRA adapters to `model` in place and freeze everything but the adapters and the head.

    Either `apply_lora(model, "qv", rank=8, alpha=8)` (targets and any other `LoraConfig` fields, which documents
    each) or `apply_lora(model, config)` with a `LoraConfig`. `loraplus_lr_ratio` is for the optimizer
    (`lora_vision.methods.LoRA.lr_ratios`) and changes nothing here. Every setting is validated before the model is
    modified; errors are `LoRAConfigError`.
    """
    if isinstance(targets, LoraConfig):
        if settings:
            raise LoRAConfigError(f"pass a LoraConfig or settings, not both (got {sorted(settings)} too)")
        config = targets
    else:
        config = LoraConfig.from_settings({"targets": targets, **settings})
    rank, alpha, dropout = config.rank, config.alpha, config.dropout
    resolved = resolve_targets(model, config.targets, config.blocks)
    names = [t.name for t in resolved]
    ranks = resolve_patterns(config.rank_pattern, names, "rank_pattern")
    alphas = resolve_patterns(config.alpha_pattern, names, "alpha_pattern")
    for name in names:
        try:
            check_hyperparameters(ranks.get(name, rank), alphas.get(name, alpha), dropout)
        except LoRAConfigError as err:
            raise LoRAConfigError(f"{name} (from rank_pattern/alpha_pattern): {err}") from None
    too_small = [
        f"{t.name} (rank {ranks.get(t.name, rank)} exceeds max {_max_rank(t)})"
        for t in resolved
        if ranks.get(t.name, rank) > _max_rank(t)
    ]
    if too_small:
        raise LoRAConfigError(f"lora rank too large for these layers: {', '.join(too_small)}")
    variants = {key: getattr(config, key) for key in VARIANT_FIELDS}
    for target in resolved:
        layer = _build(target, ranks.get(target.name, rank), alphas.get(target.name, alpha), dropout, variants)
        if layer.adapter_parameters > layer.base_parameters:
            warnings.warn(
                f"LoRA on {target.name} adds {layer.adapter_parameters:,} parameters, more than the "
                f"{layer.base_parameters:,} of the layer itself; consider a lower rank or other targets",
                UserWarning,
                stacklevel=2,
            )
        model.set_submodule(target.name, layer)
    freeze_backbone(model, config.train_head)
    return summarize(model)


def named_lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of `model` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_layers(model: nn.Module) -> list[LoRALayer]:
    return list(named_lora_layers(model).values())


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight, so inference costs what the base model costs."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora` (to float rounding)."""
    for layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain model (no adapter modules) whose weights include the merged updates.

    The result is the original timm architecture: its `state_dict()` loads into `timm.create_model(name)`.
    Every parameter is trainable again, as in a freshly created model. With `inplace=False` the given model is
    left untouched.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALayer):
            module.merge()
            model.set_submodule(name, module.base)
    return model.requires_grad_(True)
