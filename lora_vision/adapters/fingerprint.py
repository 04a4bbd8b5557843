"""Fingerprints of a base model's weights and structure, and the check that a base is the one an adapter records.

An adapter applied to other weights silently computes something else, so every loader refuses, before it touches
the base, one whose architecture, class count, tensor structure or weights differ from the recorded ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lora_vision.adapters.errors import AdapterMismatchError, BaseWeightsMismatchError
from lora_vision.adapters.tensors import backbone_tensors
from lora_vision.lora import LoRALayer, classifier_name, lora_layers


def _hash(tensors: Iterator[tuple[str, Tensor]], with_values: bool) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if with_values:
            # Viewed as raw bytes so every dtype (bfloat16 too) hashes without a numpy conversion of its values.
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of the backbone weights of a timm model, adapted or not (but not merged).

    Hashes every state-dict tensor except the classifier head: name, dtype, shape and bytes, in name order. LoRA
    layers count as the layer they wrap, so an adapted model has the fingerprint of its base. Raises RuntimeError
    for a model with merged adapters.
    """
    return _hash(backbone_tensors(model), with_values=True)


def structure_fingerprint(model: nn.Module) -> str:
    """Like `weights_fingerprint`, but over names, dtypes and shapes only: equal for the same architecture."""
    return _hash(backbone_tensors(model), with_values=False)


def head_classes(model: nn.Module) -> int:
    """Number of outputs of the classifier head (0 for a model without one)."""
    head = classifier_name(model)
    if head is None:
        return 0
    module = model.get_submodule(head)
    module = module.base if isinstance(module, LoRALayer) else module
    return int(getattr(module, "out_features", None) or getattr(module, "out_channels", None) or model.num_classes)


def architecture(model: nn.Module) -> str:
    """The timm architecture a model was created as (`vit_base_patch16_224`), or its class name."""
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def describe_source(source: Mapping[str, Any]) -> str:
    """Where recorded base weights came from, for messages."""
    if source.get("checkpoint"):
        return f"checkpoint {source['checkpoint']}"
    if source.get("pretrained"):
        return "timm pretrained weights"
    return f"random init with seed {source.get('seed')}"


def check_base(meta: Mapping[str, Any], base: nn.Module) -> None:
    """Refuse a base the adapter whose record is `meta` was not trained on, before the base is modified."""
    if lora_layers(base):
        raise AdapterMismatchError("the base model already carries LoRA layers; load an adapter onto a plain model")
    trained_on = f"{meta['architecture']} with {meta['num_classes']} classes"
    if architecture(base) != meta["architecture"]:
        raise AdapterMismatchError(
            f"adapter was trained on {trained_on}, this base is {architecture(base)} with {head_classes(base)} classes"
        )
    if head_classes(base) != meta["num_classes"]:
        raise AdapterMismatchError(f"adapter was trained on {trained_on}, this base has {head_classes(base)} classes")
    if structure_fingerprint(base) != meta["base_structure"]:
        raise AdapterMismatchError(
            f"base tensors (names, shapes or dtypes) differ from those of the {meta['model_name']} the adapter was "
            f"trained on; create the base with the recorded kwargs {meta['model_kwargs']} and in float32"
        )
    fingerprint = weights_fingerprint(base)
    if fingerprint != meta["base_fingerprint"]:
        raise BaseWeightsMismatchError(
            f"base weights differ from the ones the adapter was trained on (fingerprint {fingerprint[:12]}… vs "
            f"{meta['base_fingerprint'][:12]}…); pass the same pretrained weights/checkpoint "
            f"(recorded source: {describe_source(meta['base_source'])})"
        )
