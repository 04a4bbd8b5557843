"""PiSSA (Meng et al., 2024, arXiv:2404.02948): A and B start as the top-r singular triplets of W0.

The residual W0 - B0 A0 stays frozen. The adapter keeps W0 (its layer's) and the initial factors B0, A0 (frozen buffers
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
    from lora_vision.lora.adapter import LoraAdapter


class PiSSA(LoraVariant):
    name = "pissa"
    label = "PiSSA"
    setting = ("init", "pissa")

    @torch.no_grad()
    def init(self, adapter: LoraAdapter) -> None:
        # At least float32 (half-precision weights); float64 would be slower and buys nothing: the initial model is
        # unchanged whatever the factors' rounding, since the adapter adds B A - B0 A0.
        u, s, vh = torch.linalg.svd(adapter._base_slots().float(), full_matrices=False)
        root = (s[:, : adapter.rank] / adapter.scale).sqrt()
        b = u[..., : adapter.rank] * root[:, None, :]
        a = root[..., None] * vh[:, : adapter.rank]
        a, b = adapter._native_factors(b.to(adapter.lora_B.dtype), a.to(adapter.lora_A.dtype))
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)
        adapter.register_buffer("pissa_A0", a.clone())
        adapter.register_buffer("pissa_B0", b.clone())

    def factors(self, adapter: LoraAdapter, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        a_dim, b_dim = adapter.rank_dims
        return (
            torch.cat([a, a - adapter.pissa_A0], dim=a_dim),
            torch.cat([b - adapter.pissa_B0, adapter.pissa_B0], dim=b_dim),
        )

    def update_replaced(self, adapter: LoraAdapter) -> None:
        adapter.pissa_A0.zero_()
        adapter.pissa_B0.zero_()

    def to_peft(self, adapter: LoraAdapter, form: PeftForm) -> PeftForm:
        b0, a0 = adapter._slot_factors(adapter.pissa_A0, adapter.pissa_B0)
        return replace(form, b=torch.cat([form.b, -b0], dim=-1), a=torch.cat([form.a, a0], dim=-2))

    @torch.no_grad()
    def from_peft(self, adapter: LoraAdapter, form: PeftForm) -> PeftForm:
        r = adapter.rank
        if form.a.shape[-2] != 2 * r:
            raise PeftFormatError(
                f"PEFT's rank {form.a.shape[-2]} per slot is not the 2 x {r} of a rank-{r} PiSSA adapter ([A; A0])"
            )
        a0, b0 = adapter._native_factors(-form.b[..., r:], form.a[:, r:])
        adapter.pissa_A0.copy_(a0)
        adapter.pissa_B0.copy_(b0)
        return replace(form, b=form.b[..., :r], a=form.a[:, :r])
