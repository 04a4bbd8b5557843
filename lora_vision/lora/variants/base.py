"""`LoraVariant`: the hooks through which a member of the LoRA family changes one adapter (`LoraAdapter`).

An adapter calls every variant it was built with at fixed points: when it computes its scale, once its factors
exist, when it reads its factors, in its forward, and when it merges or unmerges. Each hook's default leaves plain
LoRA unchanged, so a variant overrides only what it changes. Whatever a variant trains or keeps lives on the
adapter (parameters and buffers registered in `init`), so it is saved and loaded with the adapter's state, and two
adapters of one layer each keep their own; a variant instance belongs to one adapter and may hold its transient
state (e.g. what a merge folded in).

Composition. Several variants may be active on one adapter (rsLoRA + DoRA + PiSSA). Their hooks run in the order of
the variants' names, and each hook composes in one defined way:

- `scale` replaces plain LoRA's alpha / r, so at most one active variant may override it;
- `forward`, `merged_change` and `unmerged_change` together map the low-rank update onto the output and the
  weight (DoRA's rescaling), each assuming it receives the plain update, so at most one active variant may
  override any of them;
- `init`, `factors` and `update_replaced` chain: each variant sees what the ones before it left (`factors` gets
  the previous variant's factors);
- `to_peft` chains in the same order and `from_peft` in the reverse one, each adding or taking out its own part.

`check_composable` refuses, with a `LoRAConfigError` naming both, a combination in which two variants override the
same exclusive hook; `LoraConfig` and the layers call it before anything is built.

PEFT. `to_peft` and `from_peft` map a variant's part of an adapter to and from PEFT's LoRA (`PeftForm`), and
`peft_setting` is the entry of PEFT's config that switches the same function on there (None where PEFT has none).
A variant that does not define the two hooks is refused by name when an adapter that uses it is exported to, or
read from, PEFT's format: nothing is written approximately.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from lora_vision.lora.errors import LoRAConfigError, PeftFormatError

if TYPE_CHECKING:
    from lora_vision.lora.adapter import LoraAdapter


@dataclass
class PeftForm:
    """One adapter as PEFT's LoRA holds it, in slot form (see `lora_vision.lora.adapter`).

    PEFT adds `lora_alpha / R**rank_exponent * b[s] @ a[s]` to slot s, R being the whole layer's rank.

    Attributes:
        b, a: (S, out_s, k) and (S, k, fan_in) factors.
        magnitude: a per-output-channel magnitude (S, out_s) for PEFT's DoRA, or None.
        rank_exponent: how PEFT's scaling depends on the rank: 1 (lora_alpha / R) or 0.5 (lora_alpha / sqrt(R)).
    """

    b: Tensor
    a: Tensor
    magnitude: Tensor | None = None
    rank_exponent: float = 1.0


class LoraVariant:
    """A LoRA variant: `setting` is the `LoraConfig` field and the value of it that switch the variant on."""

    name: ClassVar[str]
    # How plots and tables name it.
    label: ClassVar[str]
    setting: ClassVar[tuple[str, Any]]
    # Whether the single autograd nodes (lora_vision.lora.fused, fused_conv) still compute the adapter (they know
    # plain LoRA only).
    fusable: ClassVar[bool] = True
    # The entry of PEFT's adapter_config.json that switches this variant on in PEFT, e.g. ("use_dora", True).
    peft_setting: ClassVar[tuple[str, Any] | None] = None

    def scale(self, adapter: LoraAdapter) -> float:
        """The factor the update B A is multiplied by."""
        return adapter.scale

    def init(self, adapter: LoraAdapter) -> None:
        """Called once the adapter's lora_A and lora_B exist (and hold plain LoRA's initial values)."""

    def factors(self, adapter: LoraAdapter, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The native (A, B) whose product, times the scale, is the update."""
        return a, b

    def forward(self, adapter: LoraAdapter, out: Tensor, delta: Tensor) -> Tensor:
        """The contribution to add to the adapted part of the base output `out`, given the low-rank path's."""
        return delta

    def merged_change(self, adapter: LoraAdapter, change: Tensor) -> Tensor:
        """The slot-form change a merge adds to the base weight, given the plain update's."""
        return change

    def unmerged_change(self, adapter: LoraAdapter, change: Tensor) -> Tensor:
        """The slot-form change an unmerge takes out of the (merged) base weight, given the plain update's."""
        return change

    def update_replaced(self, adapter: LoraAdapter) -> None:
        """Called after `set_low_rank_update` wrote new factors (the update must then be exactly B A)."""

    def to_peft(self, adapter: LoraAdapter, form: PeftForm) -> PeftForm:
        """`form` (plain LoRA's, with the earlier variants' parts) with this variant's part of `adapter` added."""
        raise self._no_peft_mapping()

    def from_peft(self, adapter: LoraAdapter, form: PeftForm) -> PeftForm:
        """Set this variant's part of `adapter` from PEFT's `form`; return the rest, as `to_peft` received it."""
        raise self._no_peft_mapping()

    def _no_peft_mapping(self) -> PeftFormatError:
        return PeftFormatError(
            f"variant {self.name} has no PEFT mapping ({type(self).__name__} defines no to_peft/from_peft), so "
            "PEFT's format cannot carry its adapters exactly"
        )


# Hooks that replace a part of plain LoRA's computation instead of transforming what earlier variants left.
EXCLUSIVE_HOOKS = (("scale",), ("forward", "merged_change", "unmerged_change"))


def _overrides(variant: type[LoraVariant], hooks: Iterable[str]) -> bool:
    return any(getattr(variant, hook) is not getattr(LoraVariant, hook) for hook in hooks)


def check_composable(variants: Iterable[type[LoraVariant]]) -> None:
    """A `LoRAConfigError` naming two of `variants` that override the same exclusive hook (see the module doc)."""
    variants = list(variants)
    for hooks in EXCLUSIVE_HOOKS:
        owners = [variant.name for variant in variants if _overrides(variant, hooks)]
        if len(owners) > 1:
            raise LoRAConfigError(
                f"LoRA variants {owners[0]} and {owners[1]} do not compose: both override {'/'.join(hooks)}, which "
                "only one active variant may change; switch one of them off"
            )
