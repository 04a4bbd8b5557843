"""LoRA layers: a frozen base layer plus a trainable low-rank update (Hu et al., 2021, arXiv:2106.09685).

    y = base(x) + scale * B(A(dropout(x))),   scale = alpha / r

`A` is Kaiming-uniform initialised (as the base layer's own weight would be) and `B` is zero, so a new adapter
leaves the model's function exactly unchanged. The scale is a float: integer division (`alpha // r`) would
silently switch the adapter off whenever alpha < r.

Each layer keeps the wrapped module as `self.base`, so `merge()` can fold `scale * B @ A` into `base.weight` and
inference then costs exactly what the base layer costs; `unmerge()` subtracts it again.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_vision.lora.errors import LoRAConfigError, check_hyperparameters

QKV_SLOTS = ("q", "k", "v")


class LoRALayer(nn.Module, ABC):
    """State shared by all LoRA layers: the frozen base, rank, scale, dropout and merge bookkeeping."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base: nn.Module, rank: int, alpha: float | None, dropout: float) -> None:
        check_hyperparameters(rank, alpha, dropout)
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        base.requires_grad_(False)

    @abstractmethod
    def delta_weight(self) -> Tensor:
        """The update `scale * B @ A`, shaped like `base.weight`."""

    @abstractmethod
    def adapter_forward(self, x: Tensor, out: Tensor) -> Tensor:
        """Add the low-rank update for input `x` to the base output `out`."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if not self.merged:
            return self.adapter_forward(x, out)
        if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
            # A merged adapter is invisible to autograd: training on would silently leave A and B untouched.
            raise RuntimeError("LoRA weights are merged into the base layer; call unmerge() before training")
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (idempotent)."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again. Restores the weight up to float rounding (about 1 ulp of the weight)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    @property
    def adapter_parameters(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    @property
    def base_parameters(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    @property
    def parts(self) -> str:
        """Which part of the base output is adapted, for summaries ("all", or e.g. "q,v")."""
        return "all"


class LoRALinear(LoRALayer):
    """LoRA on an `nn.Linear`, optionally on only some equal-size output slices ("slots") of it.

    timm ViTs compute q, k and v with one fused `qkv` Linear (out = 3 * dim). With `num_slots=3` and
    `slots=(0, 2)` only Wq and Wv are adapted, each with its own rank-r pair A_i (r x in), B_i (dim x r), while
    Wk stays exactly frozen: the Wq, Wv setting of the LoRA paper. Adapting the whole fused layer
    (`num_slots=1`, what PEFT can express) instead shares one A across q, k and v.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        num_slots: int = 1,
        slots: Sequence[int] | None = None,
    ) -> None:
        if num_slots < 1 or base.out_features % num_slots:
            raise LoRAConfigError(f"cannot split {base.out_features} output features into {num_slots} equal slots")
        slots = tuple(range(num_slots)) if slots is None else tuple(sorted(set(slots)))
        if not slots or not all(0 <= s < num_slots for s in slots):
            raise LoRAConfigError(f"slots must be a non-empty subset of 0..{num_slots - 1}, got {slots}")
        super().__init__(base, rank, alpha, dropout)
        self.num_slots = num_slots
        self.slots = slots
        slot_out = base.out_features // num_slots
        weight = base.weight
        self.lora_A = nn.Parameter(weight.new_empty(len(slots), rank, base.in_features))
        self.lora_B = nn.Parameter(weight.new_zeros(len(slots), slot_out, rank))
        self.register_buffer("slot_index", torch.tensor(slots, device=weight.device), persistent=False)
        self.reset_parameters()

    @staticmethod
    def max_rank(base: nn.Linear, num_slots: int = 1) -> int:
        return min(base.in_features, base.out_features // num_slots)

    def reset_parameters(self) -> None:
        # Per slot, so each A_i gets nn.Linear's own fan-in (in_features), not that of the stacked tensor.
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def adapter_forward(self, x: Tensor, out: Tensor) -> Tensor:
        # One matmul computes A_i x for all slots; scaling the rank-r activations is cheaper than the output.
        h = F.linear(self.dropout(x), self.lora_A.flatten(0, 1)) * self.scale
        h = h.unflatten(-1, (len(self.slots), self.rank))
        delta = torch.einsum("...sr,sor->...so", h, self.lora_B)
        if len(self.slots) == self.num_slots:
            return out + delta.flatten(-2)
        return out.unflatten(-1, (self.num_slots, -1)).index_add(-2, self.slot_index, delta).flatten(-2)

    def delta_weight(self) -> Tensor:
        per_slot = torch.bmm(self.lora_B, self.lora_A) * self.scale
        full = per_slot.new_zeros(self.num_slots, *per_slot.shape[1:])
        return full.index_copy(0, self.slot_index, per_slot).flatten(0, 1)

    @property
    def parts(self) -> str:
        if self.num_slots == 1:
            return "all"
        names = QKV_SLOTS if self.num_slots == len(QKV_SLOTS) else tuple(map(str, range(self.num_slots)))
        return ",".join(names[s] for s in self.slots)


class LoRAConv2d(LoRALayer):
    """LoRA on an `nn.Conv2d` or any subclass (e.g. timm's `Conv2dSame`, which pads at run time).

    The update treats the kernel as an (out, in/groups * kh * kw) matrix: dW = B @ A with A (r, in/groups, kh, kw)
    and B (out, r), so its rank is at most r and it folds into the weight exactly. Unmerged, A runs as a conv
    with the base layer's own kernel size, stride, padding, dilation and padding mode (r output channels) and
    B as a 1x1 conv r -> out. This differs from loralib's ConvLoRA, which factorises an (out*k, in*k)
    reshaping of the kernel, so its update has rank up to r*k rather than r.

    Grouped and depthwise convs: dW has the base weight's (out, in/groups, kh, kw) shape, i.e. every output
    channel's kernel moves within the span of r shared basis kernels. Merging stays exact and any rank up to
    `max_rank` works (PEFT refuses to merge grouped convs and requires rank % groups == 0).
    """

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout)
        weight = base.weight
        self.lora_A = nn.Parameter(weight.new_empty(rank, *weight.shape[1:]))
        self.lora_B = nn.Parameter(weight.new_zeros(base.out_channels, rank))
        self.reset_parameters()

    @staticmethod
    def max_rank(base: nn.Conv2d) -> int:
        return min(base.out_channels, math.prod(base.weight.shape[1:]))

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _base_conv(self, x: Tensor, kernel: Tensor) -> Tensor:
        # Running the base layer's own forward with another kernel reproduces its exact geometry (padding
        # mode, dynamic "same" padding of subclasses) without re-implementing any of it.
        return torch.func.functional_call(self.base, {"weight": kernel, "bias": None}, (x,))

    def adapter_forward(self, x: Tensor, out: Tensor) -> Tensor:
        x = self.dropout(x)
        if self.base.groups == 1:
            h = self._base_conv(x, self.lora_A) * self.scale
            return out + F.conv2d(h, self.lora_B[:, :, None, None])
        # Grouped: one conv with the composed kernel, since the two-conv form would need groups * r
        # intermediate channels (r times the input for a depthwise conv).
        return out + self._base_conv(x, self.delta_weight())

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A.flatten(1)).view_as(self.base.weight) * self.scale
