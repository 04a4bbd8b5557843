"""rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): scale = alpha / sqrt(r).

With alpha / r the update's magnitude shrinks as r grows, so a rank sweep also sweeps the effective learning
rate; alpha / sqrt(r) keeps it stable across ranks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lora_vision.lora.variants.base import LoraVariant

if TYPE_CHECKING:
    from lora_vision.lora.layers import LoRALayer


class RsLoRA(LoraVariant):
    name = "rslora"
    label = "rsLoRA"
    setting = ("rslora", True)

    def scale(self, layer: LoRALayer) -> float:
        return layer.alpha / math.sqrt(layer.rank)
