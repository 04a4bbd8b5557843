"""Putting adapters into a model, freezing the rest, and merging them back out."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from lora_vision.lora.adapter import QKV_SLOTS, LoraAdapter
from lora_vision.lora.config import VARIANT_FIELDS, LoraConfig
from lora_vision.lora.errors import LoRAConfigError, check_hyperparameters
from lora_vision.lora.heads import AdapterHeads
from lora_vision.lora.layers import DEFAULT_ADAPTER, AdapterNameError, LoRAConv2d, LoRALayer, LoRALinear
from lora_vision.lora.routing import model_adapter_names, routed_modules
from lora_vision.lora.summary import ParameterSummary, summarize
from lora_vision.lora.targets import Target, classifier_name, resolve_patterns, resolve_targets


def _max_rank(target: Target) -> int:
    if isinstance(target.module, nn.Conv2d):
        return LoRAConv2d.max_rank(target.module)
    return LoRALinear.max_rank(target.module, 1 if target.slots is None else len(QKV_SLOTS))


def _build(
    model: nn.Module, target: Target, name: str, rank: int, alpha: float | None, dropout: float, variants: dict
) -> LoraAdapter:
    """Adapter `name` on `target`: added to the LoRA layer already there, or to a new one that replaces the module."""
    options = {} if target.slots is None else {"num_slots": len(QKV_SLOTS), "slots": target.slots}
    existing = model.get_submodule(target.name)
    if isinstance(existing, LoRALayer):
        return existing.add_adapter(name, rank, alpha, dropout, **options, **variants)
    layer_class = LoRAConv2d if isinstance(target.module, nn.Conv2d) else LoRALinear
    layer = layer_class(target.module, rank, alpha, dropout, **options, **variants, adapter_name=name)
    model.set_submodule(target.name, layer)
    return layer.adapter(name)


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


def apply_lora(
    model: nn.Module,
    targets: str | Sequence[str] | LoraConfig,
    adapter_name: str = DEFAULT_ADAPTER,
    **settings: Any,
) -> ParameterSummary:
    """Add LoRA adapters to `model` in place and freeze everything but the adapters and the head.

    Either `apply_lora(model, "qv", rank=8, alpha=8)` (targets and any other `LoraConfig` fields, which documents
    each) or `apply_lora(model, config)` with a `LoraConfig`. `loraplus_lr_ratio` is for the optimizer
    (`lora_vision.methods.LoRA.lr_ratios`) and changes nothing here. Every setting is validated before the model is
    modified; errors are `LoRAConfigError`.

    `adapter_name` names the adapters this call adds: a model takes several (`apply_lora(model, "qv",
    adapter_name="woof")`, then `apply_lora(model, "mlp", adapter_name="cifar")`), each with its own settings;
    layers two of them target hold both. All of them are active afterwards (`set_active_adapters` picks).
    """
    if isinstance(targets, LoraConfig):
        if settings:
            raise LoRAConfigError(f"pass a LoraConfig or settings, not both (got {sorted(settings)} too)")
        config = targets
    else:
        config = LoraConfig.from_settings({"targets": targets, **settings})
    rank, alpha, dropout = config.rank, config.alpha, config.dropout
    resolved = resolve_targets(model, config.targets, config.blocks, adapter_name)
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
        rank_here, alpha_here = ranks.get(target.name, rank), alphas.get(target.name, alpha)
        adapter = _build(model, target, adapter_name, rank_here, alpha_here, dropout, variants)
        base_parameters = sum(p.numel() for p in target.module.parameters())
        if adapter.adapter_parameters > base_parameters:
            warnings.warn(
                f"LoRA on {target.name} adds {adapter.adapter_parameters:,} parameters, more than the "
                f"{base_parameters:,} of the layer itself; consider a lower rank or other targets",
                UserWarning,
                stacklevel=2,
            )
    freeze_backbone(model, config.train_head)
    return summarize(model)


def named_lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of `model` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_layers(model: nn.Module) -> list[LoRALayer]:
    return list(named_lora_layers(model).values())


def transfer_adapters(source: nn.Module, target: nn.Module, name: str) -> None:
    """Every LoRA layer's adapter of `source` (a copy of `target`'s base, one adapter per layer) into the same layer
    of `target`, as adapter `name`: from then on it computes against `target`'s frozen weights."""
    for layer_name, layer in named_lora_layers(source).items():
        module = target.get_submodule(layer_name)
        if not isinstance(module, LoRALayer):
            module = type(layer)(module)
            target.set_submodule(layer_name, module)
        for adapter in layer.adapters.values():
            module.attach_adapter(name, adapter)


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Apply the adapters `names` to every sample (each layer applies those it holds, summed); the model's other
    adapters are kept but skipped. A routing (`lora_vision.lora.routing.route`) overrides this per sample."""
    names = [names] if isinstance(names, str) else list(names)
    held = model_adapter_names(model)
    unknown = [name for name in names if name not in held]
    if unknown:
        raise AdapterNameError(
            f"the model holds no adapter {unknown[0]!r}; it holds {', '.join(sorted(held)) or 'none'}"
        )
    for module in routed_modules(model):
        module.set_active(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer and head; a layer left without adapters becomes its base again."""
    held = model_adapter_names(model)
    if name not in held:
        raise AdapterNameError(f"the model holds no adapter {name!r}; it holds {', '.join(sorted(held)) or 'none'}")
    for module_name, module in list(model.named_modules()):
        if isinstance(module, LoRALayer) and name in module.adapters:
            module.remove_adapter(name)
            if not module.adapters:
                model.set_submodule(module_name, module.base)
        elif isinstance(module, AdapterHeads) and name in module.heads:
            del module.heads[name]
            module.set_active(a for a in module.active if a != name)


def merge_lora(model: nn.Module) -> None:
    """Fold the active adapter into its base weights, so inference costs what the base model costs.

    Refused while several adapters are active: after a merge every sample goes through the merged weights.
    """
    active = {name for layer in lora_layers(model) for name in layer.active}
    if len(active) > 1:
        raise LoRAConfigError(
            f"adapters {', '.join(sorted(active))} are active: a merge folds one adapter into the weights every "
            "sample goes through; set_active_adapters(model, name) first"
        )
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
