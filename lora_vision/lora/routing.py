"""Mixed batches: each sample through its own adapter, in one pass over a model that holds several.

    with route(model, ["woof", "cifar", "woof", None]):
        logits = model(images)          # sample i through adapter names[i]; None: the base model alone

Every LoRA layer (and a per-adapter classifier head, `AdapterHeads`) splits the batch by adapter once: the samples
of one adapter go through it together, as they would through a model holding only that adapter (the single-adapter
path, fused node included), and the outputs are put back in the batch's order. So routing costs the base layer's
work once and each adapter's on its own samples, with one gather per group and no Python loop over samples. A
layer an adapter does not target gives its samples the base output, as that adapter's own model would.

Samples must run along the first dimension of every routed layer's input, as in timm's ViTs, ResNets and
EfficientNets; a layer that sees another batch size says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lora_vision.lora.errors import LoRAConfigError


class RoutingError(LoRAConfigError, ValueError):
    """A routing that does not fit the model or the batch; the message names the adapter or the sizes."""


class Routing:
    """Each sample's adapter name (None: no adapter) for one forward pass, grouped once per device."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
        groups: dict[str | None, list[int]] = {}
        for index, name in enumerate(self.names):
            groups.setdefault(name, []).append(index)
        self.groups = groups
        self._on_device: dict[torch.device, tuple[list[Tensor], Tensor]] = {}

    def _indices(self, device: torch.device) -> tuple[list[Tensor], Tensor]:
        """Each group's sample indices, and the permutation that puts the groups' outputs back in batch order."""
        if device not in self._on_device:
            indices = [torch.tensor(rows, device=device) for rows in self.groups.values()]
            self._on_device[device] = (indices, torch.cat(indices).argsort())
        return self._on_device[device]

    def apply(self, x: Tensor, through: Callable[[str | None, Tensor], Tensor]) -> Tensor:
        """`through(name, samples)` for each adapter's samples of `x`, put back in the batch's order."""
        if x.shape[0] != len(self.names):
            raise RoutingError(
                f"the routing names an adapter for {len(self.names)} samples, but a routed layer got a batch of "
                f"{x.shape[0]} along its first dimension"
            )
        if len(self.groups) == 1:
            return through(next(iter(self.groups)), x)
        indices, order = self._indices(x.device)
        outputs = [through(name, x.index_select(0, rows)) for name, rows in zip(self.groups, indices, strict=True)]
        return torch.cat(outputs).index_select(0, order)


def routed_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that take a routing: LoRA layers and per-adapter heads."""
    return [module for module in model.modules() if hasattr(module, "routing") and hasattr(module, "adapter_names")]


def model_adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name the model holds, in the order they first appear."""
    names: dict[str, None] = {}
    for module in routed_modules(model):
        names.update(dict.fromkeys(module.adapter_names))
    return list(names)


@contextmanager
def route(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Within the block, sample i of every batch goes through adapter `names[i]` (None: the base model alone)."""
    held = model_adapter_names(model)
    unknown = sorted({name for name in names if name is not None} - set(held))
    if unknown:
        raise RoutingError(
            f"the routing names adapter {unknown[0]!r}, which the model does not hold; it holds "
            f"{', '.join(sorted(held)) or 'none'}"
        )
    modules = routed_modules(model)
    if any(getattr(module, "merged", False) for module in modules):
        raise RoutingError("an adapter is merged into its base weight; unmerge before routing a mixed batch")
    routing = Routing(names)
    for module in modules:
        module.routing = routing
    try:
        yield
    finally:
        for module in modules:
            module.routing = None


def forward_routed(model: nn.Module, x: Tensor, names: Sequence[str | None]) -> Tensor:
    """`model(x)` with sample i through adapter `names[i]`."""
    with route(model, names):
        return model(x)
