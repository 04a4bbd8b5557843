"""Post-hoc rank truncation: which rank would the trained adapters have needed?

Each slot's update dW = B @ A is replaced by its best rank-k approximation (Eckart-Young: the top k singular
triplets), so ||dW - dW_k||_F^2 is the sum of the dropped s_i^2, the least any rank-k update can achieve.
Evaluating the truncated models for several k shows how accuracy depends on the rank actually used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lora_vision.analyze.spectra import SpectrumRow, low_rank_svd
from lora_vision.lora import LoRALayer, lora_layers


@torch.no_grad()
def _truncate_layer(layer: LoRALayer, k: int) -> None:
    B, A = layer.low_rank_update()
    u, s, vh = low_rank_svd(B, A)
    # sqrt(s) on both sides keeps B and A equally scaled, as a rank-k adapter that trains on would want.
    root = s[..., :k].sqrt()
    new_B = (u[..., :k] * root[..., None, :]).to(B.dtype)
    new_A = (root[..., None] * vh[..., :k, :]).to(A.dtype)
    # The layer refuses to replace a merged update; take it out and fold the truncated one back in.
    merged = layer.merged
    layer.unmerge()
    layer.set_low_rank_update(new_B, new_A)
    if merged:
        layer.merge()


def truncate_adapters(model: nn.Module, k: int) -> nn.Module:
    """A deep copy of `model` whose every adapter update is its best rank-k approximation.

    Adapters of rank <= k are copied unchanged, bit for bit (a PiSSA update, of rank up to 2r, too). k = 0
    removes every low-rank update, which gives the base model back except for a DoRA magnitude, which stays.
    The given model is not modified.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"truncation rank must be an integer >= 0, got {k!r}")
    truncated = copy.deepcopy(model)
    for layer in lora_layers(truncated):
        if k < layer.rank:
            _truncate_layer(layer, k)
    return truncated


def trained_rank(model: nn.Module) -> int:
    """The largest adapter rank in `model`: truncating to it or beyond changes nothing."""
    ranks = [layer.rank for layer in lora_layers(model)]
    if not ranks:
        raise ValueError("the model has no LoRA adapters to truncate")
    return max(ranks)


def default_ranks(rank: int) -> list[int]:
    """Powers of two below the trained rank, then the rank itself: 8 -> [1, 2, 4, 8], 6 -> [1, 2, 4, 6]."""
    return [2**i for i in range(rank.bit_length()) if 2**i < rank] + [rank]


def retained_energy(spectra: Iterable[SpectrumRow], k: int) -> float:
    """The share of all adapters' update energy sum(s_i^2) that truncation to rank k keeps."""
    kept = total = 0.0
    for row in spectra:
        energy = [s * s for s in row.singular_values]
        total += sum(energy)
        kept += sum(energy) if k >= row.rank else sum(energy[:k])
    return kept / total if total else 1.0


@dataclass(frozen=True)
class TruncationRow:
    """Metrics of the model with every adapter truncated to rank k (k >= the trained rank: the full adapters)."""

    k: int
    full: bool
    metrics: Mapping[str, float]
    retained_energy: float | None = None

    @property
    def label(self) -> str:
        return "full" if self.full else "no update" if self.k == 0 else f"rank {self.k}"


def evaluate_truncations(
    model: nn.Module,
    ranks: Sequence[int],
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    include_zero: bool = True,
    spectra: Sequence[SpectrumRow] | None = None,
) -> list[TruncationRow]:
    """Evaluate `model` truncated to each rank in `ranks`, in increasing k.

    The full adapters (k = the trained rank) are always evaluated as the reference and, with `include_zero`,
    so is k = 0, the model without its low-rank updates. `evaluate` takes a model and returns its metrics (e.g.
    acc1, acc5, loss). With `spectra` (from `layer_spectra` of the same model) each row also records the share
    of update energy kept.
    """
    full_rank = trained_rank(model)
    # Ranks beyond the trained one leave every adapter as it is: one "full" row stands for all of them.
    ks = sorted({*(min(k, full_rank) for k in ranks), full_rank, *([0] if include_zero else [])})
    rows = []
    for k in ks:
        metrics = dict(evaluate(truncate_adapters(model, k)))
        energy = None if spectra is None else retained_energy(spectra, k)
        rows.append(TruncationRow(k, k >= full_rank, metrics, energy))
    return rows


def smallest_sufficient_rank(rows: Sequence[TruncationRow], metric: str = "acc1", tolerance: float = 0.005) -> int:
    """The smallest evaluated k whose `metric` is within `tolerance` of the full adapters' value.

    The tolerance is in the metric's own units: 0.005 is half a point of an accuracy given as a fraction.
    """
    reference = next(row.metrics[metric] for row in rows if row.full)
    return min(row.k for row in rows if row.metrics[metric] >= reference - tolerance)
