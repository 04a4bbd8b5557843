"""PiSSA (Meng et al., 2024, arXiv:2404.02948): A and B start as the top-r singular triplets of W0.

The residual W0 - B0 A0 stays frozen. The layer keeps W0 and the initial factors B0, A0 (frozen buffers
`pissa_B0`, `pissa_A0`) and adds scale * (B A - B0 A0), computed as scale * ((B - B0) A + B0 (A - A0)): both
terms are exactly zero at initialisation, so the initial model is bit-for-bit unchanged and the update is always
relative to W0 (an adapter file loads onto the untouched pretrained weights, and analysis sees what training
changed). That update has rank up to 2r, and PEFT holds it exactly as a LoRA of rank 2r: A = [A; A0], B = [B, -B0].
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lora_vision.lora.errors import PeftFormatError
from lora_vision.lora.variants.base import LoraVariant, PeftForm

if TYPE_CHECKING:
    from lora_vision.lora.layers import LoRALayer


class PiSSA(LoraVariant):
    name = "pissa"
    label = "PiSSA"
    setting = ("init", "pissa")

    @torch.no_grad()
    def init(self, layer: LoRALayer) -> None:
        # At least float32 (half-precision weights); float64 would be slower and buys nothing: the initial model is
        # unchanged whatever the factors' rounding, since the layer adds B A - B0 A0.
        u, s, vh = torch.linalg.svd(layer._base_slots().float(), full_matrices=False)
        root = (s[:, : layer.rank] / layer.scale).sqrt()
        b = u[..., : layer.rank] * root[:, None, :]
        a = root[..., None] * vh[:, : layer.rank]
        a, b = layer._native_factors(b.to(layer.lora_B.dtype), a.to(layer.lora_A.dtype))
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
        layer.register_buffer("pissa_A0", a.clone())
        layer.register_buffer("pissa_B0", b.clone())

    def factors(self, layer: LoRALayer, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        a_dim, b_dim = layer.rank_dims
        return (
            torch.cat([a, a - layer.pissa_A0], dim=a_dim),
            torch.cat([b - layer.pissa_B0, layer.pissa_B0], dim=b_dim),
        )

    def update_replaced(self, layer: LoRALayer) -> None:
        layer.pissa_A0.zero_()
        layer.pissa_B0.zero_()

    def to_peft(self, layer: LoRALayer, form: PeftForm) -> PeftForm:
        b0, a0 = layer._slot_factors(layer.pissa_A0, layer.pissa_B0)
        return replace(form, b=torch.cat([form.b, -b0], dim=-1), a=torch.cat([form.a, a0], dim=-2))

    @torch.no_grad()
    def from_peft(self, layer: LoRALayer, form: PeftForm) -> PeftForm:
        r = layer.rank
        if form.a.shape[-2] != 2 * r:
            raise PeftFormatError(
                f"PEFT's rank {form.a.shape[-2]} per slot is not the 2 x {r} of a rank-{r} PiSSA adapter ([A; A0])"
            )
        a0, b0 = layer._native_factors(-form.b[..., r:], form.a[:, r:])
        layer.pissa_A0.copy_(a0)
        layer.pissa_B0.copy_(b0)
        return replace(form, b=form.b[..., :r], a=form.a[:, :r])
