"""rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): scale = alpha / sqrt(r).

With alpha / r the update's magnitude shrinks as r grows, so a rank sweep also sweeps the effective learning
rate; alpha / sqrt(r) keeps it stable across ranks.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from lora_vision.lora.variants.base import LoraVariant, PeftForm

if TYPE_CHECKING:
    from lora_vision.lora.adapter import LoraAdapter


class RsLoRA(LoraVariant):
    name = "rslora"
    label = "rsLoRA"
    setting = ("rslora", True)
    peft_setting = ("use_rslora", True)

    def scale(self, adapter: LoraAdapter) -> float:
        return adapter.alpha / math.sqrt(adapter.rank)

    def to_peft(self, adapter: LoraAdapter, form: PeftForm) -> PeftForm:
        # PEFT's use_rslora divides lora_alpha by sqrt(R), as this variant divides alpha by sqrt(r).
        return replace(form, rank_exponent=0.5)

    def from_peft(self, adapter: LoraAdapter, form: PeftForm) -> PeftForm:
        # The adapter's scale follows from its own alpha and rank; the factors carry nothing of this variant.
        return replace(form, rank_exponent=1.0)
