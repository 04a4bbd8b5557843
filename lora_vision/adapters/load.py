"""Loading an adapter of either format: ours (`adapter.json`) or PEFT's (`adapter_config.json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lora_vision.adapters.native import load_native_adapted_model, load_native_adapter
from lora_vision.adapters.peft import is_peft_adapter, load_peft_adapted_model, load_peft_adapter


def load_adapter(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Apply the adapter at `path` (directory or one of its files) to `base_model` in place; return it in eval mode.

    The base is checked first (architecture, class count, tensor structure, weight fingerprint) and refused with
    `AdapterMismatchError` naming the difference. Then the recorded method is applied and the saved tensors are
    loaded strictly. A PEFT adapter directory is read as `lora_vision.adapters.peft.load_peft_adapter` reads it.
    """
    if is_peft_adapter(path):
        return load_peft_adapter(path, base_model)
    return load_native_adapter(path, base_model)


def load_adapted_model(
    path: str | Path, checkpoint: str | Path | None = None, pretrained: bool | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the recorded base model and load the adapter at `path` onto it; return (model, adapter meta).

    The base comes from the recorded source unless overridden: `checkpoint` (a local weights file) or `pretrained`.
    A randomly initialised base is recreated from the recorded seed, which gives the same weights only if nothing
    drew random numbers before the model was built; the fingerprint check tells. A PEFT adapter made by PEFT (no
    lora_vision record beside it) is built on the base its config names.
    """
    if is_peft_adapter(path):
        return load_peft_adapted_model(path, checkpoint, pretrained)
    return load_native_adapted_model(path, checkpoint, pretrained)
