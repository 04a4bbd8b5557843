"""Per-layer spectra of the learned updates: how much of its rank budget each adapter actually uses.

Every adapter's update of one slot is a product dW = B @ A with B (out, R) and A (R, fan_in), R small. Its
singular value decomposition comes from two thin QR factorisations and the SVD of an R x R core:

    B = Qb Rb,  A^T = Qa Ra   =>   dW = Qb (Rb Ra^T) Qa^T = (Qb U) S (Qa V)^T   with  Rb Ra^T = U S V^T

which is exact and costs O((out + fan_in) R^2) instead of an SVD of the full out x fan_in matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_vision.lora import LoRALayer
from lora_vision.lora.targets import block_index

DEFAULT_THRESHOLDS = (0.9, 0.99)

# A spectrum that sits exactly on a threshold (s = [3, 1] reaches 90% of the energy at k = 1) must not be
# pushed past it by the last bit of rounding in the cumulative sum.
_ENERGY_RTOL = 1e-12


@torch.no_grad()
def low_rank_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD `(U, S, Vh)` of `B @ A` without forming it; batched over leading dimensions.

    `B` is (..., out, R) and `A` (..., R, fan_in); `U` is (..., out, m), `S` (..., m) in descending order and
    `Vh` (..., m, fan_in) with m = min(out, fan_in, R). Runs in float64, so the spectrum is as exact as a dense
    SVD of the product, whatever the adapter's own dtype.
    """
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().mT)
    u, s, vh = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    return qb @ u, s, vh @ qa.mT


def effective_rank(singular_values: Tensor | Sequence[float], threshold: float) -> int:
    """The smallest k whose top-k singular values hold `threshold` of the energy sum(s_i^2); 0 for a zero update."""
    energy = torch.as_tensor(singular_values, dtype=torch.float64).square().sort(descending=True).values
    total = energy.sum()
    if total == 0:
        return 0
    reached = energy.cumsum(0) >= threshold * total * (1 - _ENERGY_RTOL)
    return int(reached.nonzero()[0, 0]) + 1


def spectral_norm(weight: Tensor) -> Tensor:
    """||W||_2 of each matrix in a (..., m, n) batch, from the eigenvalues of the smaller Gram matrix.

    A full SVD of a wide conv kernel (ResNet-50: 512 x 4608) takes seconds; the min(m, n)-square Gram matrix
    gives the largest singular value to float64 accuracy in a fraction of that.
    """
    gram = weight @ weight.mT if weight.shape[-2] <= weight.shape[-1] else weight.mT @ weight
    return torch.linalg.eigvalsh(gram)[..., -1].clamp(min=0).sqrt()


@dataclass(frozen=True)
class SpectrumRow:
    """The spectrum of one adapted slot (q, k, v of a fused qkv, or "all" for a whole layer).

    The update is the low-rank dW = B @ A: for DoRA the change of the direction, its trained magnitude aside.
    """

    layer: str
    slot: str
    block: int | None
    kind: str
    variant: str
    rank: int
    out_features: int
    fan_in: int
    singular_values: tuple[float, ...]
    effective_ranks: dict[float, int]
    update_norm: float
    base_norm: float
    base_spectral_norm: float

    @property
    def relative_norm(self) -> float:
        """||dW||_F / ||W0||_F: how far the adapter moved this slot's weight."""
        return self.update_norm / self.base_norm if self.base_norm else float("nan")

    @property
    def top_relative(self) -> float:
        """sigma_1(dW) / ||W0||_2: the update's strongest direction against the weight's own."""
        top = self.singular_values[0] if self.singular_values else 0.0
        return top / self.base_spectral_norm if self.base_spectral_norm else float("nan")

    @property
    def part(self) -> str:
        """The layer's role independent of depth ("blocks.attn.qkv:q", "conv2"), for grouping across blocks."""
        role = ".".join(c for c in self.layer.split(".") if not c.isdigit() and block_index(c) is None)
        return role if self.slot == "all" else f"{role}:{self.slot}"


@torch.no_grad()
def _layer_rows(name: str, layer: LoRALayer, thresholds: Sequence[float]) -> list[SpectrumRow]:
    B, A = layer.low_rank_update()
    _, s, _ = low_rank_svd(B, A)
    base = layer.base_matrix().double()
    base_norms = torch.linalg.matrix_norm(base)
    spectral_norms = spectral_norm(base)
    return [
        SpectrumRow(
            layer=name,
            slot=slot,
            block=block_index(name),
            kind=type(layer.base).__name__,
            variant=layer.variant,
            rank=layer.rank,
            out_features=B.shape[-2],
            fan_in=A.shape[-1],
            singular_values=tuple(s[i].tolist()),
            effective_ranks={t: effective_rank(s[i], t) for t in thresholds},
            update_norm=float(s[i].square().sum().sqrt()),
            base_norm=float(base_norms[i]),
            base_spectral_norm=float(spectral_norms[i]),
        )
        for i, slot in enumerate(layer.slot_names)
    ]


def layer_spectra(model: nn.Module, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[SpectrumRow]:
    """One row per adapted layer and slot, in model order. Adapters must not be merged: the relative norms need
    the frozen weight W0, which a merged layer no longer holds."""
    if not all(0 < t <= 1 for t in thresholds):
        raise ValueError(f"energy thresholds must be in (0, 1], got {list(thresholds)}")
    return [
        row
        for name, module in model.named_modules()
        if isinstance(module, LoRALayer)
        for row in _layer_rows(name, module, thresholds)
    ]
