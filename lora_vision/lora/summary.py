"""The parameter budget of a prepared model: the x-axis of every accuracy-versus-parameters plot."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from lora_vision.lora.layers import DEFAULT_ADAPTER, LoRAConv2d, LoRALayer
from lora_vision.lora.targets import classifier_name


@dataclass(frozen=True)
class AdaptedLayer:
    """One adapted layer: its name, type, shape, adapted part, rank, alpha and added parameters."""

    name: str
    kind: str
    shape: str
    parts: str
    rank: int
    alpha: float
    params: int


@dataclass(frozen=True)
class ParameterSummary:
    """Trainable and total parameters of a model, with every adapter listed."""

    trainable: int
    total: int
    adapter_params: int
    head: str | None
    head_params: int
    head_trainable: bool
    layers: list[AdaptedLayer] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_percent": self.trainable_percent}

    def __str__(self) -> str:
        lines = _table(self.layers) if self.layers else ["no adapters"]
        head = f"{self.head} ({'trainable' if self.head_trainable else 'frozen'})" if self.head else "none"
        lines += [
            f"adapters:  {self.adapter_params:,} parameters in {len(self.layers)} layers",
            f"head:      {head}, {self.head_params:,} parameters",
            f"trainable: {self.trainable:,} / {self.total:,} ({self.trainable_percent:.3f}%)",
        ]
        return "\n".join(lines)


def _table(layers: list[AdaptedLayer]) -> list[str]:
    rows = [("layer", "type", "shape", "parts", "rank", "alpha", "params")]
    rows += [(x.name, x.kind, x.shape, x.parts, str(x.rank), f"{x.alpha:g}", f"{x.params:,}") for x in layers]
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    # Text columns left-aligned, numbers right-aligned.
    return [
        "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]


def _shape(layer: LoRALayer) -> str:
    base = layer.base
    if isinstance(layer, LoRAConv2d):
        kh, kw = base.kernel_size
        extras = [f"s{base.stride[0]}"] if max(base.stride) > 1 else []
        extras += [f"d{base.dilation[0]}"] if max(base.dilation) > 1 else []
        extras += [f"g{base.groups}"] if base.groups > 1 else []
        return " ".join([f"{base.in_channels}->{base.out_channels}", f"{kh}x{kw}", *extras])
    return f"{base.in_features}->{base.out_features}"


def summarize(model: nn.Module) -> ParameterSummary:
    """Count trainable/total parameters and list the LoRA layers of `model` as it is now."""
    # One row per adapter; the default adapter's row is named by its layer alone, as a single-adapter model's.
    layers = [
        AdaptedLayer(
            name if adapter_name == DEFAULT_ADAPTER else f"{name} [{adapter_name}]",
            type(m.base).__name__,
            _shape(m),
            adapter.parts,
            adapter.rank,
            adapter.alpha,
            adapter.adapter_parameters,
        )
        for name, m in model.named_modules()
        if isinstance(m, LoRALayer)
        for adapter_name, adapter in m.adapters.items()
    ]
    head_name = classifier_name(model)
    head_params = list(model.get_submodule(head_name).parameters()) if head_name else []
    return ParameterSummary(
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in model.parameters()),
        adapter_params=sum(x.params for x in layers),
        head=head_name,
        head_params=sum(p.numel() for p in head_params),
        head_trainable=bool(head_params) and all(p.requires_grad for p in head_params),
        layers=layers,
    )
