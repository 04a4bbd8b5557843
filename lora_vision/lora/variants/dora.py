"""DoRA (Liu et al., 2024, arXiv:2402.09353): W' = m * (W0 + dW) / ||W0 + dW||.

The norm is taken per output channel; the magnitude m (initialised to ||W0||, the adapter's `lora_magnitude`)
trains and the direction gets the low-rank update. The norm is treated as a constant in the backward pass, as
the paper's section 4.3 does to save memory.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lora_vision.lora.errors import PeftFormatError
from lora_vision.lora.variants.base import LoraVariant, PeftForm

if TYPE_CHECKING:
    from lora_vision.lora.adapter import LoraAdapter


class DoRA(LoraVariant):
    name = "dora"
    label = "DoRA"
    setting = ("dora", True)
    fusable = False
    peft_setting = ("use_dora", True)

    def __init__(self) -> None:
        self._merged_factor: Tensor | None = None

    def init(self, adapter: LoraAdapter) -> None:
        adapter.lora_magnitude = nn.Parameter(adapter._base_slots().norm(dim=-1))

    @staticmethod
    def factor(adapter: LoraAdapter) -> Tensor:
        """m / ||W0 + dW|| per output channel (S, out_s), the norm detached (DoRA section 4.3)."""
        norm = (adapter._base_slots() + adapter._slot_delta()).norm(dim=-1).detach()
        # A dead (all-zero) channel has m = 0 too; clamping keeps its factor at 0 instead of 0/0.
        return adapter.lora_magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def forward(self, adapter: LoraAdapter, out: Tensor, delta: Tensor) -> Tensor:
        # m/||W|| (W0 x + dW x) + b, written as out + (f - 1) W0 x + f dW x: both terms are exactly zero at
        # initialisation (f = 1, dW = 0), so a new adapter leaves the output bit-for-bit unchanged.
        factor = adapter._per_channel(self.factor(adapter))
        base_out = adapter._adapted_part(out)
        if adapter.base.bias is not None:
            base_out = base_out - adapter._per_channel(adapter._bias_slots())
        return (factor - 1) * base_out + factor * delta

    def merged_change(self, adapter: LoraAdapter, change: Tensor) -> Tensor:
        factor = self.factor(adapter)
        self._merged_factor = factor
        return (factor[..., None] - 1) * adapter._base_slots() + factor[..., None] * change

    def unmerged_change(self, adapter: LoraAdapter, change: Tensor) -> Tensor:
        # Divide the merged weight by the factor the merge used (the current factor would read the merged weight).
        merged = adapter._base_slots()
        original = merged / self._merged_factor[..., None] - change
        self._merged_factor = None
        return merged - original

    def to_peft(self, adapter: LoraAdapter, form: PeftForm) -> PeftForm:
        # PEFT's DoRA is this function: the magnitude over the detached per-channel norm of W0 + scale B A.
        return replace(form, magnitude=adapter.lora_magnitude.detach())

    @torch.no_grad()
    def from_peft(self, adapter: LoraAdapter, form: PeftForm) -> PeftForm:
        if form.magnitude is None:
            raise PeftFormatError("a DoRA adapter, but PEFT's tensors hold no lora_magnitude_vector for it")
        adapter.lora_magnitude.copy_(form.magnitude)
        return replace(form, magnitude=None)
