"""`LoraVariant`: the hooks through which a member of the LoRA family changes a `LoRALayer`.

A layer calls every active variant at fixed points: when it computes its scale, once its factors exist, when it
reads its factors, in its forward, and when it merges or unmerges. Each hook's default leaves plain LoRA
unchanged, so a variant overrides only what it changes. Whatever a variant trains or keeps lives on the layer
(parameters and buffers registered in `init`), so it is saved and loaded with the layer's state dict; a variant
instance belongs to one layer and may hold that layer's transient state (e.g. what a merge folded in).

Several variants compose (rsLoRA + DoRA + PiSSA); hooks run in the order of the variants' names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from lora_vision.lora.layers import LoRALayer


class LoraVariant:
    """A LoRA variant: `setting` is the `LoraConfig` field and the value of it that switch the variant on."""

    name: ClassVar[str]
    # How plots and tables name it.
    label: ClassVar[str]
    setting: ClassVar[tuple[str, Any]]
    # Whether lora_vision.lora.fused's single autograd node still computes the layer (it knows plain LoRA only).
    fusable: ClassVar[bool] = True

    def scale(self, layer: LoRALayer) -> float:
        """The factor the update B A is multiplied by."""
        return layer.scale

    def init(self, layer: LoRALayer) -> None:
        """Called once the layer's lora_A and lora_B exist (and hold plain LoRA's initial values)."""

    def factors(self, layer: LoRALayer, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The native (A, B) whose product, times the scale, is the update."""
        return a, b

    def forward(self, layer: LoRALayer, out: Tensor, delta: Tensor) -> Tensor:
        """The contribution to add to the adapted part of the base output `out`, given the low-rank path's."""
        return delta

    def merged_change(self, layer: LoRALayer, change: Tensor) -> Tensor:
        """The slot-form change a merge adds to the base weight, given the plain update's."""
        return change

    def unmerged_change(self, layer: LoRALayer, change: Tensor) -> Tensor:
        """The slot-form change an unmerge takes out of the (merged) base weight, given the plain update's."""
        return change

    def update_replaced(self, layer: LoRALayer) -> None:
        """Called after `set_low_rank_update` wrote new factors (the update must then be exactly B A)."""
