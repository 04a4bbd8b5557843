"""What the adapters themselves cost, layer by layer: each adapted layer's forward and backward on the input it
sees in a training step, for every side, against the frozen layer.

`python -m lora_vision.bench.layers [--configs GLOB ...] [--runs N] [--repeats N] [--out DIR]`

A step's PEFT/ours (results.md) divides two step times of which the adapters are a small part: in ResNet-50
conv3x3 what either implementation adds to the frozen network is about a tenth of the step, and on a shared
two-core machine each side's spread from round to round (an interquartile range of 4-5% of the step in
`experiments/benchmarks/conv_amd/results.md`) is as large as everything the two implementations do differently.
Here that shared part is left out. One training-mode forward pass of the bench batch through ours records every
adapted layer's input, and whether it needs a gradient there (it does wherever an adapted layer lies before it).
Each layer then runs alone on that input, forward and backward with a fixed random output gradient and its
adapter's gradients cleared first (as `zero_grad` leaves them), as ours, PEFT's LoRA module, the composed torch ops
where the row has them, and the floor's frozen layer, in rotating order. The floor's time is what the layer costs
without LoRA, so side - floor is what that side's adapter adds. The report sums both over the layers, run by run,
and gives PEFT/ours of the added time and of the layers' time. Left out, and in the step ratio only: the optimizer
step (the same AdamW over the same parameters on both sides), and what one layer's work does to the next one's
(caches, allocator): a layer alone runs with its input in cache. It runs on the CPU.
"""

from __future__ import annotations

import dataclasses
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
    select_lora_configs,
)
from lora_vision.bench.report import header, record_rows
from lora_vision.bench.sides import (
    COMPOSED,
    FLOOR,
    OURS,
    PEFT,
    adapted_names,
    build_row,
)
from lora_vision.bench.timing import Spread, time_runs

ADDED_SIDES = (OURS, PEFT, COMPOSED)
LAYER_REPEATS = 11


@dataclass(frozen=True)
class LayerInput:
    """An adapted layer as a step feeds it: its input (requiring grad where the step's does) and an output gradient."""

    name: str
    x: Tensor
    grad: Tensor


def layer_inputs(model: nn.Module, names: Sequence[str], images: Tensor, seed: int) -> list[LayerInput]:
    """Every named layer's input in one training-mode forward pass of `images` through `model`, in the order the
    pass reaches them, each with a random gradient for its output (in the output's memory layout)."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    seen: dict[str, LayerInput] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            if name not in seen:  # a layer called twice in one pass is timed on its first input
                x = args[0].detach().clone().requires_grad_(args[0].requires_grad)
                grad = torch.empty_like(output.detach()).normal_(generator=generator)
                seen[name] = LayerInput(name, x, grad)

        return record

    handles = [model.get_submodule(name).register_forward_hook(recorder(name)) for name in names]
    try:
        with torch.enable_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return list(seen.values())


def side_layer(model: nn.Module, side: str, name: str) -> nn.Module:
    """The layer `name` (as named in the unadapted model) in a side's model."""
    root = model.base_model.model if side == PEFT else model
    return root.get_submodule(name)


def layer_step(layer: nn.Module, given: LayerInput) -> Callable[[], None]:
    """One forward and backward of `layer` on the recorded input, its trainable gradients cleared first."""
    trainable = [p for p in layer.parameters() if p.requires_grad]

    def run() -> None:
        given.x.grad = None
        for parameter in trainable:
            parameter.grad = None
        out = layer(given.x)
        if out.requires_grad:
            out.backward(given.grad)

    return run


def _ratio(numerators: list[float], denominators: list[float]) -> dict[str, Any] | None:
    """numerator/denominator run by run; None where a denominator is not positive (noise above a tiny cost)."""
    if any(d <= 0 for d in denominators):
        return None
    return Spread.of([n / d for n, d in zip(numerators, denominators, strict=True)]).as_dict()


def layers_row(config: BenchConfig, settings: Settings) -> dict[str, Any]:
    """Every adapted layer of `config` timed alone on each side, and the sums over the layers, run by run."""
    spec, base, images, _, models = build_row(config, settings)
    sides = tuple(models)
    inputs = layer_inputs(models[OURS], adapted_names(base, config), images, settings.seed)
    totals = [dict.fromkeys(sides, 0.0) for _ in range(settings.runs)]
    layers = []
    for given in inputs:
        calls = {side: layer_step(side_layer(models[side], side, given.name), given) for side in sides}
        runs = time_runs(calls, settings.runs, settings.warmup, settings.repeats, settings.steps)
        for total, run in zip(totals, runs.medians, strict=True):
            for side in sides:
                total[side] += run[side]
        layers.append(
            {
                "name": given.name,
                "input_shape": list(given.x.shape),
                "input_grad": given.x.requires_grad,
                "ms": {side: stats.median for side, stats in runs.pooled.items()},
            }
        )
    added = {side: [run[side] - run[FLOOR] for run in totals] for side in sides if side != FLOOR}
    row: dict[str, Any] = {
        "config": config.name,
        "model": spec.label,
        "batch_size": settings.batch(spec),
        "adapted_layers": len(layers),
        "layers": layers,
        "runs_ms": totals,
        "ms": {side: Spread.of([run[side] for run in totals]).as_dict() for side in sides},
        "added_ms": {side: Spread.of(values).as_dict() for side, values in added.items()},
    }
    for other in (PEFT, COMPOSED):
        if other in sides:
            row[f"{other}_over_ours_added"] = _ratio(added[other], added[OURS])
            row[f"{other}_over_ours"] = _ratio([run[other] for run in totals], [run[OURS] for run in totals])
    return row


def _spread(value: dict[str, Any] | None) -> str:
    if value is None:
        return "-"
    return f"{value['median']:.3f} ({value['min']:.3f}-{value['max']:.3f})"


def _median(values: dict[str, dict[str, Any]], side: str) -> str:
    return f"{values[side]['median']:.1f}" if side in values else "-"


def _layer_table(row: dict[str, Any]) -> list[str]:
    lines = [
        f"### {row['config']}",
        "",
        "| layer | input | input grad | floor ms | ours + ms | PEFT + ms | composed + ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in row["layers"]:
        ms = layer["ms"]
        added = [f"{ms[side] - ms[FLOOR]:+.2f}" if side in ms else "-" for side in ADDED_SIDES]
        shape = "x".join(str(size) for size in layer["input_shape"])
        grad = "yes" if layer["input_grad"] else "no"
        lines.append(f"| {layer['name']} | {shape} | {grad} | {ms[FLOOR]:.2f} | " + " | ".join(added) + " |")
    return [*lines, ""]


def markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    lines = [
        *header(record, "What the adapters cost, layer by layer"),
        f"- settings: rank {settings['rank']}, alpha {settings['alpha']:g}, fp32; every adapted layer alone, forward "
        f"and backward on its input from the bench batch; {settings['runs']} runs of {settings['warmup']} warm-up "
        f"and {settings['repeats']} timed rounds per layer, the sides in rotating order",
        "",
        "Layers ms: the adapted layers' forward and backward summed over the layers (the floor's: the frozen",
        "layers). Added ms: side - floor, what the adapters add. Values are the median of the runs; ratios the",
        "median of the runs' ratios, with the lowest and highest run in parentheses. PEFT/ours > 1: ours is faster.",
        "",
        "| config | model | batch | adapted layers | layers ms floor / ours / PEFT / composed | added ms ours / PEFT / "
        "composed | PEFT/ours added | PEFT/ours layers | composed/ours added |",
        "|" + "---|" * 9,
    ]
    for row in record["rows"]:
        ms, added = row["ms"], row["added_ms"]
        cells = [
            row["config"],
            row["model"],
            str(row["batch_size"]),
            str(row["adapted_layers"]),
            " / ".join(_median(ms, side) for side in (FLOOR, *ADDED_SIDES)),
            " / ".join(_median(added, side) for side in ADDED_SIDES),
            _spread(row.get(f"{PEFT}_over_ours_added")),
            _spread(row.get(f"{PEFT}_over_ours")),
            _spread(row.get(f"{COMPOSED}_over_ours_added")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Per layer (medians over all runs)", ""]
    for row in record["rows"]:
        lines += _layer_table(row)
    return "\n".join(lines)


DEFAULT_CONFIGS = ["resnet50/conv3x3", "resnet50/all_convs", "effnet_lite0/*", "vit_s16/all_linear"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = adapter_tool_parser(
        "python -m lora_vision.bench.layers",
        __doc__.split("\n")[0],
        DEFAULT_CONFIGS,
        "layers",
        repeats_help=f"timed rounds per layer and run (default {LAYER_REPEATS})",
    )
    args = parser.parse_args(argv)
    args.steps = 1
    settings = cpu_settings(args)
    if args.repeats is None and not args.quick:
        # A layer's sample takes milliseconds, not a step's hundreds: more rounds cost little and narrow the medians.
        settings = dataclasses.replace(settings, repeats=LAYER_REPEATS)
    configs = select_lora_configs(args.configs)

    def rows() -> list[dict[str, Any]]:  # run inside the record, which times it
        return [layers_row(config, settings) for config in configs]

    record_rows("lora_vision.bench.layers", argv, settings, rows, args.out, markdown, "layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
