"""Loading an adapter of either format, ours (`adapter.json`) or PEFT's (`adapter_config.json`), and several onto
one model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_vision.adapters.errors import AdapterMismatchError
from lora_vision.adapters.native import (
    load_native_adapted_model,
    load_native_adapter,
    load_onto_recorded_base,
    read_adapter_meta,
)
from lora_vision.adapters.peft import is_peft_adapter, load_onto_peft_base, load_peft_adapted_model, load_peft_adapter
from lora_vision.adapters.tensors import plain_name
from lora_vision.errors import UserError
from lora_vision.lora import (
    AdapterHeads,
    LoRALayer,
    classifier_name,
    named_lora_layers,
    set_active_adapters,
    transfer_adapters,
)


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


def load_adapters(sources: Mapping[str, str | Path], base_model: nn.Module) -> nn.Module:
    """Load several adapters onto one base model, each under its name; return the model in eval mode.

        model = load_adapters({"woof": "runs/woof/adapter", "cifar": "peft_cifar/"}, timm.create_model(...))
        with route(model, ["woof", "cifar", ...]):      # lora_vision.lora.routing
            logits = model(images)

    Each adapter (ours or PEFT's) is checked against the base as `load_adapter` checks one (architecture, class
    count, tensor structure, weight fingerprint), so adapters of another model or class count are refused, naming
    the adapter. Each loads onto a scratch copy of the base, and its adapters then move into `base_model`, where they
    compute against its one copy of the frozen weights: loading holds two more copies of the base for a moment,
    never one per adapter. Adapters that trained their own classifier head keep it, in an `AdapterHeads` that takes the
    head's place. What adapters cannot share is refused: a changed base tensor (BitFit biases, BatchNorm
    statistics), or a mix of adapters with their own heads and adapters on the shared head. The first adapter is
    the active one (`set_active_adapters` picks another); a routing sends each sample through its own.
    """
    _check_some(sources)
    if named_lora_layers(base_model) or any(isinstance(m, AdapterHeads) for m in base_model.modules()):
        raise AdapterMismatchError("the base model already carries adapters; load adapters onto a plain model")
    head = classifier_name(base_model)
    plain = copy.deepcopy(base_model)
    shared = plain.state_dict()
    own_heads: dict[str, nn.Module] = {}
    for name, path in sources.items():
        scratch = copy.deepcopy(plain)
        try:
            load_adapter(path, scratch)
            _check_shared_tensors(scratch, shared, head)
        except UserError as err:
            raise type(err)(f"adapter {name!r} ({path}): {err}") from None
        transfer_adapters(scratch, base_model, name)
        scratch_head = None if head is None else scratch.get_submodule(head)
        if head is not None and not isinstance(scratch_head, LoRALayer):
            own_heads[name] = scratch_head
    if own_heads:
        if len(own_heads) != len(sources):
            mixed = sorted(set(sources) - set(own_heads))
            raise AdapterMismatchError(
                f"adapters {', '.join(sorted(own_heads))} trained their own classifier head, adapters "
                f"{', '.join(mixed)} adapt the shared one: load them onto separate models"
            )
        base_model.set_submodule(head, AdapterHeads(own_heads))
    set_active_adapters(base_model, next(iter(sources)))
    return base_model.eval()


def load_adapters_onto_recorded_base(
    sources: Mapping[str, str | Path], checkpoint: str | Path | None = None, pretrained: bool | None = None
) -> nn.Module:
    """`load_adapters(sources, base)` onto the base model the first adapter records, built as `load_adapted_model`
    builds it (`checkpoint` or `pretrained` override the recorded source); every adapter is checked against it."""
    _check_some(sources)
    first = next(iter(sources.values()))
    load = partial(load_adapters, sources)
    if is_peft_adapter(first):
        return load_onto_peft_base(first, load, checkpoint, pretrained)[0]
    return load_onto_recorded_base(read_adapter_meta(first), load, checkpoint, pretrained)


def _check_some(sources: Mapping[str, str | Path]) -> None:
    if not sources:
        raise AdapterMismatchError("load_adapters needs at least one adapter: give {name: directory}")


def _check_shared_tensors(model: nn.Module, shared: Mapping[str, Tensor], head: str | None) -> None:
    """Refuse an adapter that changed a tensor of the base outside its adapters and the head."""
    layers = named_lora_layers(model)
    for key, tensor in model.state_dict().items():
        plain = plain_name(key, layers)
        if plain is None or (head is not None and plain.startswith(f"{head}.")):
            continue
        if not torch.equal(tensor, shared[plain]):
            raise AdapterMismatchError(
                f"it changes the base model's {plain} (BitFit biases or BatchNorm statistics), which the adapters "
                "loaded onto one model share; load it alone (load_adapter)"
            )
