"""Which state-dict tensors of an adapted model belong to its adapter, and which to the base model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lora_vision.lora import LoRALayer, classifier_name, named_lora_layers, state_dict_key
from lora_vision.module import frozen_batchnorms


def plain_name(name: str, layers: Mapping[str, LoRALayer]) -> str | None:
    """State-dict key `name` as the plain model would call it (`.base` unwrapped), or None for a tensor a LoRA
    layer added. `layers`: the model's LoRA layers by module name."""
    for prefix in layers:
        if name.startswith(f"{prefix}."):
            inner = name[len(prefix) + 1 :]
            return f"{prefix}.{inner.removeprefix('base.')}" if inner.startswith("base.") else None
    return name


def backbone_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The base model's tensors under their plain timm names: adapter tensors skipped, `.base` unwrapped.

    The classifier head is left out: fine-tuning replaces it, so it says nothing about which weights were adapted.
    A RuntimeError for a model with merged adapters, whose base weights include the updates.
    """
    layers = named_lora_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(
            f"cannot fingerprint a model with merged LoRA weights ({', '.join(merged[:3])}, ...): its base weights "
            "now include the updates; fingerprint the base before merging, or unmerge first"
        )
    head = classifier_name(model)
    for name, tensor in model.state_dict().items():
        plain = plain_name(name, layers)
        if plain is not None and (head is None or not plain.startswith(f"{head}.")):
            yield plain, tensor


def _changed_batchnorm_buffers(model: nn.Module, all_batchnorm_stats: bool) -> set[str]:
    frozen = set() if all_batchnorm_stats else {id(m) for m in frozen_batchnorms(model)}
    return {
        f"{name}.{buffer}" if name else buffer
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and id(module) not in frozen
        for buffer, _ in module.named_buffers(recurse=False)
    }


def adapter_keys(model: nn.Module, all_batchnorm_stats: bool = False) -> list[str]:
    """State-dict keys an adapter file of `model` holds (see `adapter_state`), in state-dict order."""
    trainable = {state_dict_key(name) for name, p in model.named_parameters() if p.requires_grad}
    layers = named_lora_layers(model)
    batchnorm = _changed_batchnorm_buffers(model, all_batchnorm_stats)
    return [
        key for key in model.state_dict() if key in trainable or key in batchnorm or plain_name(key, layers) is None
    ]


def contiguous_cpu(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous CPU copies of `tensors`, as safetensors writes them."""
    return {key: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for key, t in tensors.items()}


def adapter_state(model: nn.Module, all_batchnorm_stats: bool = False) -> dict[str, Tensor]:
    """The tensors an adapter file holds, as contiguous CPU copies.

    Every trainable parameter, every tensor inside a LoRA layer but outside its `.base`, and the running statistics
    of BatchNorm layers with trainable parameters (those run in train mode, see `lora_vision.module.Classifier`).
    `all_batchnorm_stats` adds the statistics of frozen BatchNorm layers too: they change when training ran with
    `frozen_bn_eval=False`.
    """
    state = model.state_dict()
    return contiguous_cpu({key: state[key] for key in adapter_keys(model, all_batchnorm_stats)})
