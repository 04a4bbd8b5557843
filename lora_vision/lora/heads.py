"""A classifier head per adapter: tasks that share a backbone and its adapters' layers each keep their own head.

`AdapterHeads` takes the place of the model's head (timm's `get_classifier()` name) and holds one head module per
adapter name. Without a routing the one active head classifies every sample; with one
(`lora_vision.lora.routing.route`), each sample goes through its adapter's head. Every head has the same number of
classes, so a mixed batch gives one logits tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from lora_vision.lora.errors import LoRAConfigError


class AdapterHeads(nn.Module):
    """Heads by adapter name; `base` (optional) classifies samples routed to no adapter."""

    def __init__(self, heads: Mapping[str, nn.Module], base: nn.Module | None = None) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(dict(heads))
        self.base = base
        self.active: tuple[str, ...] = tuple(self.heads)[:1]
        self.routing: Any = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.heads)

    def set_active(self, names: Iterable[str]) -> None:
        self.active = tuple(name for name in dict.fromkeys(names) if name in self.heads)

    def _through(self, name: str | None, x: Tensor) -> Tensor:
        if name in self.heads:
            return self.heads[name](x)
        if self.base is None:
            raise LoRAConfigError(
                f"a sample routed to {name!r} reaches the classifier, which has a head for adapters "
                f"{', '.join(self.heads)} only"
            )
        return self.base(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.routing is not None:
            return self.routing.apply(x, self._through)
        if len(self.active) != 1:
            raise LoRAConfigError(
                f"the classifier holds a head per adapter ({', '.join(self.heads)}) and {len(self.active)} are "
                "active: activate one (set_active_adapters) or route each sample to its adapter (route)"
            )
        return self.heads[self.active[0]](x)
