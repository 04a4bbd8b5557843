"""What LoRA's memory traffic costs on top of its floor, and the step time that leaves: a limit for Linear adapters.

`python -m lora_vision.bench.traffic [--configs GLOB ...] [--runs N] [--out DIR]`

The FLOP ratio (`ideal (FLOPs)` in results.md) prices the rank-r products by their multiply-adds, but at rank 8
they are bound by memory, not arithmetic: dA = dh^T x does 2 r FLOPs per element of x it reads, where the layer's
own product does 2 out. A frozen Linear's backward needs only g and W; a LoRA Linear must keep its input x until
the backward pass and read it there, read g again for dB and dh, and add dh A into the input gradient. Per
configuration this measures:
- bytes saved for the backward pass per step (distinct storages passed through `saved_tensors_hooks`, frozen
  parameters excluded) by ours, PEFT and the floor;
- bytes the adapters' own products must read and write per step, from the shapes of every adapted layer;
- the time those products take at those shapes, run on their own (the cheaper of folding the update into W and
  adding B h into the output, as the fused node chooses), timed side by side with ours and the floor, and the
  limit it implies for each run: (floor + products) / floor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lora_vision.bench.configs import (
    BenchConfig,
    Settings,
    adapter_tool_parser,
    cpu_settings,
    positive_int,
    select_lora_configs,
)
from lora_vision.bench.peft_side import peft_version
from lora_vision.bench.report import header, record_rows
from lora_vision.bench.sides import COMPOSED, FLOOR, OURS, PEFT, TrainStep, build_row, sides_of
from lora_vision.bench.timing import Spread, time_runs
from lora_vision.lora import LoRALinear

PRODUCTS = "products"
FLOAT_BYTES = 4
MIB = 2**20


def saved_bytes(model: nn.Module, images: Tensor, labels: Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of one training step's forward, parameters
    not counted (they are in memory anyway)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and tensor.device.type != "meta":
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    del loss
    return sum(storages.values())


@dataclass(frozen=True)
class LayerShape:
    """An adapted Linear as its products see it: tokens per step, in features, out features per slot, slots."""

    tokens: int
    in_features: int
    slot_out: int
    slots: int
    out_features: int

    def product_bytes(self) -> int:
        """Bytes the cheapest LoRA step must move beyond the floor's: x read for h and again for dA, g read for dh
        and dB, the input gradient read and written once more, and the forward's addition of B h (or the pass over
        W that folds it in, whichever is smaller)."""
        x = self.tokens * self.in_features
        g = self.tokens * self.slot_out * self.slots
        forward = min(2 * g, 2 * self.in_features * self.out_features)
        return FLOAT_BYTES * (2 * x + 2 * g + 2 * x + forward)


def adapted_shapes(model: nn.Module, images: Tensor) -> list[LayerShape]:
    """The shape of every LoRALinear of `model` (ours) in a forward pass of `images`."""
    shapes: list[LayerShape] = []

    def record(layer: LoRALinear, args: tuple, output: Tensor) -> None:
        x = args[0]
        slots, _, in_features = layer.lora_A.shape
        shapes.append(LayerShape(x.numel() // in_features, in_features, layer.lora_B.shape[1], slots, output.shape[-1]))

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return shapes


def _products_of(shape: LayerShape, rank: int, generator: torch.Generator) -> tuple[Callable[[], None], ...]:
    """The products one LoRA step of `shape` needs beyond the floor's: (forward adding B h, forward folding B A into
    W, backward), on random tensors of the layer's shapes."""
    tokens, in_features, slots = shape.tokens, shape.in_features, shape.slots
    slot_out, out_features = shape.slot_out, shape.out_features

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=generator)

    x, grad_x = randn(tokens, in_features), randn(tokens, in_features)
    a, b = randn(slots * rank, in_features), randn(slots, slot_out, rank)
    out, weight = randn(tokens, out_features), randn(out_features, in_features)
    g = out.clone()

    def forward_added() -> None:
        h = torch.mm(x, a.t())
        for i in range(slots):
            out[:, i * slot_out : (i + 1) * slot_out].addmm_(h[:, i * rank : (i + 1) * rank], b[i].t())

    def forward_folded() -> None:
        merged = weight.clone()
        for i in range(slots):
            merged[i * slot_out : (i + 1) * slot_out].addmm_(b[i], a[i * rank : (i + 1) * rank])

    def backward() -> None:
        h = torch.mm(x, a.t())
        g_slots = [g[:, i * slot_out : (i + 1) * slot_out] for i in range(slots)]
        dh = torch.cat([torch.mm(g_s, b[i]) for i, g_s in enumerate(g_slots)], dim=1)
        torch.mm(dh.t(), x)
        for i, g_s in enumerate(g_slots):
            torch.mm(h[:, i * rank : (i + 1) * rank].t(), g_s)
        grad_x.addmm_(dh, a)

    return forward_added, forward_folded, backward


class ProductStep:
    """Every adapted layer's products of one step, in model order; each layer's forward is whichever of adding B h
    and folding B A into W was faster when timed alone."""

    def __init__(self, shapes: Sequence[LayerShape], rank: int, repeats: int = 5) -> None:
        generator = torch.Generator().manual_seed(0)
        timed: dict[LayerShape, tuple[Callable[[], None], Callable[[], None]]] = {}
        for shape in dict.fromkeys(shapes):
            added, folded, backward = _products_of(shape, rank, generator)
            times = time_runs({"added": added, "folded": folded}, 1, 1, repeats).pooled
            forward = added if times["added"].median <= times["folded"].median else folded
            timed[shape] = (forward, backward)
        self.calls = [timed[shape] for shape in shapes]

    def __call__(self) -> None:
        for forward, _ in self.calls:
            forward()
        for _, backward in reversed(self.calls):
            backward()


def traffic_row(config: BenchConfig, settings: Settings) -> dict[str, Any]:
    """Saved and moved bytes of `config`, and ours, the floor and the adapters' products timed side by side."""
    with_peft = peft_version() is not None
    sides = [side for side in sides_of(config, with_peft) if side != COMPOSED]
    spec, _, images, labels, models = build_row(config, settings, sides)
    saved = {side: saved_bytes(model, images, labels) / MIB for side, model in models.items()}
    shapes = adapted_shapes(models[OURS], images)
    calls: dict[str, Callable[[], None]] = {side: TrainStep(models[side], images, labels, settings) for side in sides}
    calls[PRODUCTS] = ProductStep(shapes, settings.rank)
    runs = time_runs(calls, settings.runs, settings.warmup, settings.repeats, settings.steps)
    limit = Spread.of([(run[FLOOR] + run[PRODUCTS]) / run[FLOOR] for run in runs.medians])
    return {
        "config": config.name,
        "model": spec.label,
        "batch_size": settings.batch(spec),
        "adapted_layers": len(shapes),
        "saved_mib": saved,
        "product_mib": sum(shape.product_bytes() for shape in shapes) / MIB,
        "ms": {side: stats.as_dict() for side, stats in runs.pooled.items()},
        "runs_ms": runs.medians,
        "ours_over_floor": runs.ratio(OURS, FLOOR).as_dict(),
        "limit": limit.as_dict(),
        "ours_over_limit": Spread.of([run[OURS] / (run[FLOOR] + run[PRODUCTS]) for run in runs.medians]).as_dict(),
    }


def _spread(value: dict) -> str:
    return f"{value['median']:.3f} ({value['min']:.3f}-{value['max']:.3f})"


def markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    lines = [
        *header(record, "LoRA memory traffic: what the adapters' products cost above the floor"),
        f"- settings: rank {settings['rank']}, fp32, {settings['runs']} runs of {settings['warmup']} warm-up and "
        f"{settings['repeats']} timed rounds, ours / floor / products in rotating order",
        "",
        "Saved MiB: tensors kept for the backward pass by one step's forward (parameters excluded). Product MiB:",
        "what the adapters' products must read and write per step beyond the floor's. Products ms: those products",
        "alone at the model's shapes. limit = (floor + products) / floor. Ratios: median of the runs (lowest-highest).",
        "",
        "| config | model | batch | adapted layers | saved MiB ours / PEFT / floor | product MiB | ours ms | floor ms "
        "| products ms | ours/floor | limit | ours/limit |",
        "|" + "---|" * 12,
    ]
    for row in record["rows"]:
        saved, ms = row["saved_mib"], row["ms"]
        peft = f"{saved[PEFT]:.1f}" if PEFT in saved else "-"
        cells = [
            row["config"],
            row["model"],
            str(row["batch_size"]),
            str(row["adapted_layers"]),
            f"{saved[OURS]:.1f} / {peft} / {saved[FLOOR]:.1f}",
            f"{row['product_mib']:.1f}",
            *(f"{ms[side]['median']:.1f}" for side in (OURS, FLOOR, PRODUCTS)),
            *(_spread(row[key]) for key in ("ours_over_floor", "limit", "ours_over_limit")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = adapter_tool_parser(
        "python -m lora_vision.bench.traffic",
        __doc__.split("\n")[0],
        ["vit_s16/all_linear", "vit_b16/all_linear"],
        "traffic",
    )
    parser.add_argument("--steps", type=positive_int)
    args = parser.parse_args(argv)
    settings = cpu_settings(args)
    configs = select_lora_configs(args.configs)
    if any(config.model not in ("vit_s16", "vit_b16") for config in configs):
        raise SystemExit("--configs: choose LoRA configurations of the ViTs (vit_s16/*, vit_b16/*)")

    def rows() -> list[dict[str, Any]]:  # run inside the record, which times it
        return [traffic_row(config, settings) for config in configs]

    record_rows("lora_vision.bench.traffic", argv, settings, rows, args.out, markdown, "traffic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
