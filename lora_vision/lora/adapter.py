"""One named low-rank adapter of one layer (Hu et al., 2021, arXiv:2106.09685): its factors, scale, variants,
dropout and, on a fused qkv Linear, the slots it adapts.

    update(x) = scale * B(A(dropout(x))),   scale = alpha / r   (rsLoRA: alpha / sqrt(r))

`A` is Kaiming-uniform initialised (as the base layer's own weight would be) and `B` is zero, so a new adapter
leaves the model's function exactly unchanged. The scale is a float: integer division (`alpha // r`) would
silently switch the adapter off whenever alpha < r.

A `LoRALayer` (`lora_vision.lora.layers`) owns the frozen base module and holds its adapters by name; each adapter
refers to that base without owning it, so the base is saved, moved and counted once however many adapters share
it. Everything an adapter trains or keeps (its factors, a variant's magnitude or initial factors) is its own, so
two adapters of one layer never collide, whatever their variants.

Variants (rsLoRA, DoRA, PiSSA, ...) are `lora_vision.lora.variants`, one module each, switched on by the
constructor options that `LoraConfig` declares (`rslora=True`, `dora=True`, `init="pissa"`); the adapter calls
their hooks (`LoraVariant`) when it sets its scale, once its factors exist, when it reads them, in its forward and
when it merges or unmerges.

Adapters are described in "slot form": per adapted slot s (a q/k/v slice of a fused qkv Linear, or the whole
layer), the update is the matrix B_s @ A_s of shape (out_s, fan_in), fan_in = in_features for a Linear and
in_channels / groups * kh * kw for a Conv2d. Analysis and rank truncation work on that form only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_vision.lora.config import active_variants, variant_name
from lora_vision.lora.errors import LoRAConfigError, check_hyperparameters
from lora_vision.lora.fused import linear_with_low_rank
from lora_vision.lora.fused_conv import conv2d_with_low_rank, low_precision, padded_input
from lora_vision.lora.variants import LoraVariant

QKV_SLOTS = ("q", "k", "v")


class LoraAdapter(nn.Module, ABC):
    """A low-rank update of a base layer it shares with the other adapters of its `LoRALayer`.

    Subclasses define how the factors are laid out (`_slot_factors`, `_native_factors`), how the base weight
    maps to slot form (`_base_slots_of`, `_slots_to_weight`) and the forward of the low-rank path.
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    # Dimension of lora_A and lora_B along which the rank runs.
    rank_dims: tuple[int, int]
    base: nn.Module

    def __init__(self, base: nn.Module, rank: int, alpha: float | None, dropout: float, **variants: Any) -> None:
        check_hyperparameters(rank, alpha, dropout)
        active = active_variants(variants)
        super().__init__()
        # The layer owns the base (its state-dict entries, its device moves); kept out of this module's children so
        # that it is not registered, saved or counted once per adapter.
        object.__setattr__(self, "base", base)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.variants: tuple[LoraVariant, ...] = tuple(active)
        self.scale = self.alpha / rank
        for variant in self.variants:
            self.scale = variant.scale(self)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.train(base.training)

    def _init_variants(self) -> None:
        """Called by subclasses once lora_A and lora_B exist: the variants' `init` hooks."""
        for variant in self.variants:
            variant.init(self)

    # Layout hooks -------------------------------------------------------------------------------------------

    @abstractmethod
    def _slot_factors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Native (A, B) -> slot form (B (S, out_s, R), A (S, R, fan_in))."""

    @abstractmethod
    def _native_factors(self, b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Slot form (B, A) -> native (A, B) with the adapter's own parameter shapes."""

    @abstractmethod
    def _base_slots_of(self, tensor: Tensor) -> Tensor:
        """An (out, ...) tensor of the base layer (weight, bias) in slot form (S, out_s, ...)."""

    def _base_slots(self) -> Tensor:
        """The base weight as it is now (merged or not), in slot form (S, out_s, fan_in)."""
        return self._base_slots_of(self.base.weight)

    @abstractmethod
    def _slots_to_weight(self, slots: Tensor) -> Tensor:
        """A slot-form tensor as a full weight-shaped tensor (zero outside the adapted slots)."""

    @abstractmethod
    def _low_rank_path(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """scale * B A x for the adapted part, laid out like `_adapted_part` of the output."""

    @abstractmethod
    def _adapted_part(self, out: Tensor) -> Tensor:
        """The base output of the adapted part: (..., S, out_s) for a Linear, the whole output for a Conv2d."""

    @abstractmethod
    def _per_channel(self, values: Tensor) -> Tensor:
        """A per-output-channel (S, out_s) tensor, shaped to broadcast against `_adapted_part`."""

    @abstractmethod
    def _add(self, out: Tensor, contribution: Tensor) -> Tensor:
        """The base output plus the adapter's contribution to the adapted part."""

    # Factors and updates ------------------------------------------------------------------------------------

    def factors(self) -> tuple[Tensor, Tensor]:
        """Native (A, B) whose product (times `scale`) is the update (a variant may change them: PiSSA's)."""
        a, b = self.lora_A, self.lora_B
        for variant in self.variants:
            a, b = variant.factors(self, a, b)
        return a, b

    def low_rank_update(self) -> tuple[Tensor, Tensor]:
        """(B, A) in slot form with the scale folded into B: the update of slot s is exactly B[s] @ A[s]."""
        b, a = self._slot_factors(*self.factors())
        return b * self.scale, a

    @torch.no_grad()
    def set_low_rank_update(self, b: Tensor, a: Tensor) -> None:
        """Make the update of slot s equal B[s] @ A[s] (rank k <= r; slot form). A DoRA magnitude is kept."""
        if self.merged:
            raise RuntimeError("unmerge() the adapter before replacing its update")
        k = a.shape[-2]
        if k > self.rank or b.shape[-1] != k:
            raise ValueError(f"update of rank {k} does not fit this rank-{self.rank} adapter")
        shape_b, shape_a = (t.shape for t in self._slot_factors(self.lora_A, self.lora_B))
        padded_b = b.new_zeros(shape_b)
        padded_a = a.new_zeros(shape_a)
        padded_b[..., :k] = b / self.scale
        padded_a[..., :k, :] = a
        new_a, new_b = self._native_factors(padded_b, padded_a)
        self.lora_A.copy_(new_a)
        self.lora_B.copy_(new_b)
        for variant in self.variants:
            variant.update_replaced(self)

    def _slot_delta(self) -> Tensor:
        b, a = self.low_rank_update()
        return b @ a

    def delta_weight(self) -> Tensor:
        """The low-rank update shaped like `base.weight` (for DoRA: the update of the direction)."""
        return self._slots_to_weight(self._slot_delta())

    def base_matrix(self) -> Tensor:
        """The frozen base weight W0 of the adapted slots, in slot form (S, out_s, fan_in)."""
        if self.merged:
            raise RuntimeError("the base weight holds the merged update; unmerge() first")
        return self._base_slots()

    @property
    def variant(self) -> str:
        return variant_name(v.name for v in self.variants)

    @property
    def additive(self) -> bool:
        """Whether the update adds to the base output independently of it, so that it sums with other adapters'
        (DoRA's rescales the whole output instead)."""
        return all(type(v).forward is LoraVariant.forward for v in self.variants)

    @property
    def slot_names(self) -> tuple[str, ...]:
        return ("all",)

    @property
    def parts(self) -> str:
        """Which part of the base output is adapted, for summaries ("all", or e.g. "q,v")."""
        return ",".join(self.slot_names)

    # Forward and merging ------------------------------------------------------------------------------------

    def adapter_forward(self, x: Tensor, out: Tensor) -> Tensor:
        """Add the update for input `x` to the base output `out` (of the same samples)."""
        delta = self._low_rank_path(self.dropout(x), *self.factors())
        for variant in self.variants:
            delta = variant.forward(self, out, delta)
        return self._add(out, delta)

    def forward_with_base(self, x: Tensor) -> Tensor:
        """The base layer's output for `x` with this adapter's update added."""
        return self.adapter_forward(x, self.base(x))

    def _bias_slots(self) -> Tensor:
        return self._base_slots_of(self.base.bias[:, None])[..., 0]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (idempotent)."""
        if self.merged:
            return
        change = self._slot_delta()
        for variant in self.variants:
            change = variant.merged_change(self, change)
        self.base.weight += self._slots_to_weight(change).to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out again. Restores the weight up to float rounding (about 1 ulp of the weight)."""
        if not self.merged:
            return
        change = self._slot_delta()
        for variant in self.variants:
            change = variant.unmerged_change(self, change)
        self.base.weight -= self._slots_to_weight(change).to(self.base.weight.dtype)
        self.merged = False

    @property
    def adapter_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LinearAdapter(LoraAdapter):
    """An adapter of an `nn.Linear`, optionally of only some equal-size output slices ("slots") of it.

    timm ViTs compute q, k and v with one fused `qkv` Linear (out = 3 * dim). With `num_slots=3` and
    `slots=(0, 2)` only Wq and Wv are adapted, each with its own rank-r pair A_i (r x in), B_i (dim x r), while
    Wk stays exactly frozen: the Wq, Wv setting of the LoRA paper. Adapting the whole fused layer
    (`num_slots=1`, what PEFT can express) instead shares one A across q, k and v.
    """

    rank_dims = (1, 2)

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        num_slots: int = 1,
        slots: Sequence[int] | None = None,
        **variants: Any,
    ) -> None:
        if num_slots < 1 or base.out_features % num_slots:
            raise LoRAConfigError(f"cannot split {base.out_features} output features into {num_slots} equal slots")
        slots = tuple(range(num_slots)) if slots is None else tuple(sorted(set(slots)))
        if not slots or not all(0 <= s < num_slots for s in slots):
            raise LoRAConfigError(f"slots must be a non-empty subset of 0..{num_slots - 1}, got {slots}")
        super().__init__(base, rank, alpha, dropout, **variants)
        self.num_slots = num_slots
        self.slots = slots
        slot_out = base.out_features // num_slots
        weight = base.weight
        self.lora_A = nn.Parameter(weight.new_empty(len(slots), rank, base.in_features))
        self.lora_B = nn.Parameter(weight.new_zeros(len(slots), slot_out, rank))
        self.register_buffer("slot_index", torch.tensor(slots, device=weight.device), persistent=False)
        self.reset_parameters()
        self._init_variants()

    @staticmethod
    def max_rank(base: nn.Linear, num_slots: int = 1) -> int:
        return min(base.in_features, base.out_features // num_slots)

    def reset_parameters(self) -> None:
        # Per slot, so each A_i gets nn.Linear's own fan-in (in_features), not that of the stacked tensor.
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _slot_factors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return b, a

    def _native_factors(self, b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        return a, b

    def _base_slots_of(self, tensor: Tensor) -> Tensor:
        return tensor.unflatten(0, (self.num_slots, -1)).index_select(0, self.slot_index)

    def _slots_to_weight(self, slots: Tensor) -> Tensor:
        full = slots.new_zeros(self.num_slots, *slots.shape[1:])
        return full.index_copy(0, self.slot_index, slots).flatten(0, 1)

    def forward_with_base(self, x: Tensor) -> Tensor:
        base = self.base
        fusable = (
            all(v.fusable for v in self.variants)
            and type(base).forward is nn.Linear.forward
            and not any(p.requires_grad for p in base.parameters())
        )
        if not fusable:
            return super().forward_with_base(x)
        # The same function as the composed path, in one autograd node (see lora_vision.lora.fused).
        a, b = self.factors()
        return linear_with_low_rank(x, self.dropout(x), base.weight, base.bias, a, b, self.scale, self.slots)

    def _low_rank_path(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        # One matmul computes A_i x for all slots; scaling the rank-r activations is cheaper than the output.
        h = F.linear(x, a.flatten(0, 1)) * self.scale
        h = h.unflatten(-1, (len(self.slots), a.shape[1]))
        return torch.einsum("...sr,sor->...so", h, b)

    def _adapted_part(self, out: Tensor) -> Tensor:
        return out.unflatten(-1, (self.num_slots, -1)).index_select(-2, self.slot_index)

    def _per_channel(self, values: Tensor) -> Tensor:
        return values

    def _add(self, out: Tensor, contribution: Tensor) -> Tensor:
        if len(self.slots) == self.num_slots:
            return out + contribution.flatten(-2)
        return out.unflatten(-1, (self.num_slots, -1)).index_add(-2, self.slot_index, contribution).flatten(-2)

    @property
    def slot_names(self) -> tuple[str, ...]:
        if self.num_slots == 1:
            return ("all",)
        names = QKV_SLOTS if self.num_slots == len(QKV_SLOTS) else tuple(map(str, range(self.num_slots)))
        return tuple(names[s] for s in self.slots)


class Conv2dAdapter(LoraAdapter):
    """An adapter of an `nn.Conv2d` or any subclass (e.g. timm's `Conv2dSame`, which pads at run time).

    The update treats the kernel as an (out, in/groups * kh * kw) matrix: dW = B @ A with A (r, in/groups, kh, kw)
    and B (out, r), so its rank is at most r and it folds into the weight exactly. Unmerged, A runs as a conv
    with the base layer's own kernel size, stride, padding, dilation and padding mode (r output channels) and
    B as a 1x1 map r -> out, both inside one autograd node (`lora_vision.lora.fused_conv`) wherever it can
    reproduce the base layer's geometry; otherwise (dropout in training, DoRA, an unbatched image, a conv subclass
    with its own forward) as the composed torch ops below. This differs from loralib's ConvLoRA, which factorises
    an (out*k, in*k) reshaping of the kernel, so its update has rank up to r*k rather than r.

    Grouped and depthwise convs: dW has the base weight's (out, in/groups, kh, kw) shape, i.e. every output
    channel's kernel moves within the span of r shared basis kernels. Merging stays exact and any rank up to
    `max_rank` works (PEFT refuses to merge grouped convs and requires rank % groups == 0).
    """

    rank_dims = (0, 1)

    def __init__(
        self,
        base: nn.Conv2d,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        **variants: Any,
    ) -> None:
        super().__init__(base, rank, alpha, dropout, **variants)
        weight = base.weight
        self.lora_A = nn.Parameter(weight.new_empty(rank, *weight.shape[1:]))
        self.lora_B = nn.Parameter(weight.new_zeros(base.out_channels, rank))
        self.reset_parameters()
        self._init_variants()

    @staticmethod
    def max_rank(base: nn.Conv2d) -> int:
        return min(base.out_channels, math.prod(base.weight.shape[1:]))

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _slot_factors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return b[None], a.flatten(1)[None]

    def _native_factors(self, b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        return a[0].unflatten(1, self.base.weight.shape[1:]), b[0]

    def _base_slots_of(self, tensor: Tensor) -> Tensor:
        return tensor.flatten(1)[None]

    def _slots_to_weight(self, slots: Tensor) -> Tensor:
        return slots[0].view_as(self.base.weight)

    def _base_conv(self, x: Tensor, kernel: Tensor) -> Tensor:
        # Running the base layer's own forward with another kernel reproduces its exact geometry (padding
        # mode, dynamic "same" padding of subclasses) without re-implementing any of it. A plain Conv2d's forward
        # is `_conv_forward`, called directly: functional_call's parameter swapping costs ~20 us per call.
        if type(self.base).forward is nn.Conv2d.forward:
            return self.base._conv_forward(x, kernel, None)
        return torch.func.functional_call(self.base, {"weight": kernel, "bias": None}, (x,))

    def forward_with_base(self, x: Tensor) -> Tensor:
        base = self.base
        fusable = (
            all(v.fusable for v in self.variants)
            and not (self.training and isinstance(self.dropout, nn.Dropout))
            and not any(p.requires_grad for p in base.parameters())
            and not (base.groups > 1 and low_precision(x))
            and x.dim() == 4  # nn.Conv2d also takes one unbatched (C, H, W) image; the node works on batches
        )
        padded = padded_input(base, x) if fusable else None
        if padded is None:
            return super().forward_with_base(x)
        # The same function as the composed path, in one autograd node (see lora_vision.lora.fused_conv).
        a, b = self.factors()
        return conv2d_with_low_rank(padded[0], base.weight, base.bias, a, b, self.scale, padded[1])

    def _low_rank_path(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        if self.base.groups == 1:
            h = self._base_conv(x, a) * self.scale
            return F.conv2d(h, b[:, :, None, None])
        # Grouped: one conv with the composed kernel, since the two-conv form would need groups * r
        # intermediate channels (r times the input for a depthwise conv).
        kernel = (b @ a.flatten(1)).view_as(self.base.weight) * self.scale
        return self._base_conv(x, kernel)

    def _adapted_part(self, out: Tensor) -> Tensor:
        return out

    def _per_channel(self, values: Tensor) -> Tensor:
        return values[0][:, None, None]

    def _add(self, out: Tensor, contribution: Tensor) -> Tensor:
        return out + contribution
