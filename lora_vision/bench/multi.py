"""Several adapters on one backbone. Serving: mixed batches routed per sample, against one merged model per
adapter and against switching the active adapter. Training (`--train`): a packed K-point step against K separate
steps.

    python -m lora_vision.bench.multi [--configs vit_s16/qv resnet50/conv3x3] [--adapters 1 2 4 8]
        [--device cpu|cuda] [--precision fp32|bf16] [--batch-size N] [--repeats N] [--warmup N] [--no-memory]
        [--quick] [--out DIR]

For each configuration and adapter count N, N adapters of the configuration's targets (rank 8, alpha 8, each with
its own non-zero factors) serve one mixed batch: its samples are spread evenly over the N adapters in a shuffled
order. Three ways of serving it, each returning every sample's logits in the batch's order:

- `routed`: one model holding the N adapters, the batch in one pass under `route`;
- `merged`: N plain models, each with one adapter folded into its weights (`merge_and_unload`); the batch is split
  by adapter and each part goes through its model;
- `switching`: one model holding the N unmerged adapters; the batch is split by adapter and each part goes through
  the model with its adapter set active (`set_active_adapters`).

`merged` and `switching` split the batch and put the logits back in order with the same `Routing` that every
routed layer uses, so the three differ only in how the adapters meet the base weights. The approaches are timed
side by side in rotating order (`lora_vision.bench.timing`), in eval mode under `torch.inference_mode()`, and
`tests/test_bench.py` checks that they give every sample the same logits. Memory: the parameters each approach
holds (N whole models against one base plus N adapters), and, measured in a fresh process per approach on the CPU
(in this one on CUDA), what building its models adds (resident set, or CUDA memory allocated) and the peak while
it serves batches. Writes DIR/multi_adapter.md and DIR/multi_adapter.json with the machine and the command.

With `--train`, N counts the points of a rank sweep (ranks 1, 2, 4, ... 32, then again), each with its own
trainable head, trained on one batch:

- `packed`: one model holding the N points' adapters and heads (`AdapterHeads`); the batch copied N times, each copy
  routed to its point, the N losses summed, one backward pass and one AdamW step: what `multitask.sampling=packed`
  and `hydra/launcher=packed` train;
- `separate`: N models of one point each, N training steps on the batch.

Each point's parameters get its own gradient either way (`tests/test_bench.py` checks that one packed step equals
N separate steps). Writes DIR/packed_training.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_vision.bench.configs import (
    PRECISIONS,
    BenchConfig,
    Settings,
    non_negative_int,
    positive_int,
    select_configs,
    settings_from,
)
from lora_vision.bench.memory import MIB, in_child, max_rss, memory_baseline
from lora_vision.bench.report import header, machine
from lora_vision.bench.sides import TrainStep, autocast, build_base, make_batch
from lora_vision.bench.timing import time_alternating
from lora_vision.lora import (
    AdapterHeads,
    apply_lora,
    classifier_name,
    lora_layers,
    merge_and_unload,
    route,
    set_active_adapters,
    transfer_adapters,
)
from lora_vision.lora.routing import Routing
from lora_vision.module import frozen_batchnorms
from lora_vision.results import write_atomic, write_json_atomic

ROUTED, MERGED, SWITCHING = "routed", "merged", "switching"
APPROACHES = (ROUTED, MERGED, SWITCHING)
ADAPTER_COUNTS = (1, 2, 4, 8)
DEFAULT_CONFIGS = ("vit_s16/qv", "resnet50/conv3x3")
# A serving batch with two images per adapter at N = 8; --quick's tiny models take one each.
SERVING_BATCH, QUICK_BATCH = 16, 8
OUT_NAME = "multi_adapter"
TRAIN_OUT_NAME = "packed_training"
PACKED, SEPARATE = "packed", "separate"
TRAIN_APPROACHES = (PACKED, SEPARATE)
# The ranks of a rank sweep's points, in turn.
SWEEP_RANKS = (1, 2, 4, 8, 16, 32)
# The adapters' factors: large enough that every adapter changes the logits, small enough to keep them finite.
FACTOR_STD = 0.02

Serve = Callable[[Tensor], Tensor]
Step = Callable[[], object]


def adapter_names(count: int) -> list[str]:
    return [f"task{index}" for index in range(count)]


def batch_size(settings: Settings) -> int:
    return settings.batch_size or (QUICK_BATCH if settings.quick else SERVING_BATCH)


def mixed_routing(count: int, size: int, seed: int) -> list[str]:
    """Each sample's adapter: `size` samples spread evenly over `count` adapters, in a shuffled order."""
    names = adapter_names(count)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return [names[int(position) % count] for position in order]


def batch_images(config: BenchConfig, settings: Settings) -> Tensor:
    spec = settings.model(config)
    generator = torch.Generator().manual_seed(settings.seed)
    images = torch.randn(batch_size(settings), 3, spec.image_size, spec.image_size, generator=generator)
    return images.to(settings.device)


def adapted_model(config: BenchConfig, settings: Settings, indices: Sequence[int]) -> nn.Module:
    """The configuration's base model (seeded) holding adapters `task<i>` for `indices`, in eval mode.

    Adapter i's factors are drawn from seed + 1 + i whatever else the model holds, so every model holding it holds
    the same adapter.
    """
    model = build_base(settings.model(config), settings)
    for index in indices:
        name = f"task{index}"
        apply_lora(
            model,
            config.targets,
            adapter_name=name,
            rank=settings.rank,
            alpha=settings.alpha,
            blocks=config.blocks,
            train_head=False,
        )
        generator = torch.Generator().manual_seed(settings.seed + 1 + index)
        with torch.no_grad():
            for layer in lora_layers(model):
                for param in layer.adapters[name].parameters():
                    param.copy_(torch.randn(param.shape, generator=generator).mul_(FACTOR_STD).to(param.device))
    return model.eval()


def build_approach(approach: str, config: BenchConfig, count: int, settings: Settings) -> tuple[Serve, list[nn.Module]]:
    """(serve, the models it holds): `serve(images)` gives the logits of the mixed batch of `count` adapters."""
    plan = Routing(mixed_routing(count, batch_size(settings), settings.seed))
    if approach == MERGED:
        merged = {
            f"task{index}": merge_and_unload(adapted_model(config, settings, [index]), inplace=True).eval()
            for index in range(count)
        }
        return (lambda images: plan.apply(images, lambda name, part: merged[name](part))), list(merged.values())
    model = adapted_model(config, settings, range(count))
    if approach == ROUTED:

        def routed(images: Tensor) -> Tensor:
            with route(model, plan.names):
                return model(images)

        return routed, [model]
    if approach == SWITCHING:

        def switched(name: str | None, part: Tensor) -> Tensor:
            set_active_adapters(model, name)
            return model(part)

        return (lambda images: plan.apply(images, switched)), [model]
    raise ValueError(f"unknown approach {approach!r}; approaches: {', '.join(APPROACHES)}")


def serve_once(serve: Serve, images: Tensor, settings: Settings) -> Tensor:
    with torch.inference_mode(), autocast(settings):
        return serve(images)


def parameter_count(models: Sequence[nn.Module]) -> int:
    return sum(param.numel() for model in models for param in model.parameters())


def _resident_bytes() -> int:
    """The resident set size of this process now (Linux), or its high-water mark elsewhere."""
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        return max_rss()
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serving_memory(approach: str, config: BenchConfig, count: int, settings: Settings) -> dict[str, float]:
    """MiB that building the approach's models adds (`held`) and the most it reaches while serving `memory_steps`
    batches (`peak`), above what this process held before: the resident set on the CPU (run it in a fresh process,
    `in_child`, so no earlier model's pages count), CUDA memory allocated on a GPU."""
    images = batch_images(config, settings)
    cuda, before = memory_baseline(settings, _resident_bytes)
    serve, models = build_approach(approach, config, count, settings)
    gc.collect()
    held = torch.cuda.memory_allocated() if cuda else _resident_bytes()
    for _ in range(settings.memory_steps):
        serve_once(serve, images, settings)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else max_rss()
    del serve, models
    return {"held": (held - before) / MIB, "peak": (peak - before) / MIB}


def _measured_memory(
    measure: Callable[[str, BenchConfig, int, Settings], dict[str, float]],
    approach: str,
    config: BenchConfig,
    count: int,
    settings: Settings,
) -> dict[str, float]:
    """`measure(...)` in this process on CUDA, in a fresh child process on the CPU (see `serving_memory`)."""
    if torch.device(settings.device).type == "cuda":
        memory = measure(approach, config, count, settings)
        gc.collect()
        torch.cuda.empty_cache()
        return memory
    return in_child(measure, approach, config, count, settings)


def _timed_rows(
    config: BenchConfig,
    count: int,
    settings: Settings,
    built: dict[str, tuple[Step, list[nn.Module]]],
    batch: int,
    baseline: str,
    measure: Callable[[str, BenchConfig, int, Settings], dict[str, float]],
) -> list[dict[str, Any]]:
    """One row per approach of `built` ({approach: (call, models held)}), timed side by side: `batch` images per
    adapter per call, the time against `baseline`'s, the parameters held and `measure`'s memory."""
    stats = time_alternating(
        {approach: call for approach, (call, _) in built.items()},
        settings.warmup,
        settings.repeats,
        settings.steps,
        _sync(settings),
    )
    parameters = {approach: parameter_count(models) for approach, (_, models) in built.items()}
    approaches = list(built)
    built.clear()
    gc.collect()
    images = batch * (count if baseline == PACKED else 1)
    rows = []
    for approach in approaches:
        row: dict[str, Any] = {
            "config": config.name,
            "model": settings.model(config).label,
            "adapters": count,
            "approach": approach,
            "batch_size": batch,
            "ms": stats[approach].as_dict(),
            "images_per_s": images / stats[approach].median * 1e3,
            f"over_{baseline}": stats[approach].median / stats[baseline].median,
            "parameters": parameters[approach],
        }
        if settings.memory:
            row["memory_mib"] = _measured_memory(measure, approach, config, count, settings)
        rows.append(row)
    return rows


def _sync(settings: Settings) -> Callable[[], object]:
    if torch.device(settings.device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def bench_count(config: BenchConfig, count: int, settings: Settings) -> list[dict[str, Any]]:
    """The rows of `count` adapters: every approach timed side by side, then its memory."""
    images = batch_images(config, settings)
    built: dict[str, tuple[Step, list[nn.Module]]] = {}
    for approach in APPROACHES:
        serve, models = build_approach(approach, config, count, settings)
        built[approach] = ((lambda serve=serve: serve_once(serve, images, settings)), models)
    return _timed_rows(config, count, settings, built, len(images), ROUTED, serving_memory)


def point_models(config: BenchConfig, count: int, settings: Settings) -> list[nn.Module]:
    """`count` models of one sweep point each (rank SWEEP_RANKS[i % 6], alpha 8, a trainable head), in train mode
    but for frozen BatchNorm layers."""
    models = []
    for index in range(count):
        model = build_base(settings.model(config), settings)
        rank = SWEEP_RANKS[index % len(SWEEP_RANKS)]
        apply_lora(model, config.targets, rank=rank, alpha=settings.alpha, blocks=config.blocks, train_head=True)
        models.append(_frozen_bn_eval(model.train()))
    return models


def _frozen_bn_eval(model: nn.Module) -> nn.Module:
    # As `Classifier` trains (frozen_bn_eval): a pack must, or a BatchNorm's batch statistics would mix its points.
    for bn in frozen_batchnorms(model):
        bn.eval()
    return model


def packed_model(points: Sequence[nn.Module], settings: Settings, config: BenchConfig) -> nn.Module:
    """One frozen base holding copies of the points' adapters (`p<i>`) and heads (`AdapterHeads`)."""
    model = build_base(settings.model(config), settings).requires_grad_(False)
    heads = {}
    for index, point in enumerate(points):
        scratch = copy.deepcopy(point)
        transfer_adapters(scratch, model, f"p{index}")
        heads[f"p{index}"] = scratch.get_classifier()
    model.set_submodule(classifier_name(model), AdapterHeads(heads))
    return _frozen_bn_eval(model.train())


class PackedStep:
    """One packed training step: the batch once per point, each copy through its point, the losses summed."""

    def __init__(self, model: nn.Module, count: int, images: Tensor, labels: Tensor, settings: Settings) -> None:
        self.model, self.images, self.labels, self.settings = model, images, labels, settings
        self.routing = [f"p{index}" for index in range(count) for _ in range(len(labels))]
        self.inputs = images.repeat(count, *[1] * (images.dim() - 1))
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)

    def __call__(self) -> None:
        with autocast(self.settings), route(self.model, self.routing):
            logits = self.model(self.inputs)
        losses = [F.cross_entropy(part, self.labels) for part in logits.split(len(self.labels))]
        torch.stack(losses).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_training(approach: str, config: BenchConfig, count: int, settings: Settings) -> tuple[Step, list[nn.Module]]:
    """(one training step of the approach, the models it holds)."""
    images, labels = make_batch(settings.model(config), settings)
    points = point_models(config, count, settings)
    if approach == PACKED:
        model = packed_model(points, settings, config)
        return PackedStep(model, count, images, labels, settings), [model]
    if approach == SEPARATE:
        steps = [TrainStep(point, images, labels, settings) for point in points]
        return (lambda: [step() for step in steps]), points
    raise ValueError(f"unknown approach {approach!r}; approaches: {', '.join(TRAIN_APPROACHES)}")


def training_memory(approach: str, config: BenchConfig, count: int, settings: Settings) -> dict[str, float]:
    """MiB that building the approach adds (`held`) and the most it reaches over `memory_steps` steps (`peak`)."""
    cuda, before = memory_baseline(settings, _resident_bytes)
    step, models = build_training(approach, config, count, settings)
    held = torch.cuda.memory_allocated() if cuda else _resident_bytes()
    for _ in range(settings.memory_steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else max_rss()
    del step, models
    return {"held": (held - before) / MIB, "peak": (peak - before) / MIB}


def bench_training(config: BenchConfig, count: int, settings: Settings) -> list[dict[str, Any]]:
    """The rows of `count` points: packed and separate steps timed side by side, then their memory."""
    built = {approach: build_training(approach, config, count, settings) for approach in TRAIN_APPROACHES}
    batch = settings.batch(settings.model(config))
    return _timed_rows(config, count, settings, built, batch, PACKED, training_memory)


def training_markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    lines = [
        *header(record, "Sweep points trained together: a packed N-point step against N separate steps"),
        f"- settings: alpha {settings['alpha']:g}, {settings['precision']}, AdamW; point i has rank "
        f"{'/'.join(map(str, SWEEP_RANKS))}[i % 6] and its own trainable head; rounds of {settings['steps']} step(s) "
        f"per approach in rotating order: {settings['warmup']} warm-up, {settings['repeats']} timed; memory over "
        f"{settings['memory_steps']} steps",
        "",
        "packed: one model holding every point, the batch copied once per point and routed, the losses summed, one",
        "backward and one AdamW step. separate: a model per point, one step each. ms is the median time of the N",
        "points' training on the batch, with the interquartile range; time / packed > 1 means packing is faster.",
        "MiB built / peak: what building the models added to the process and the most it reached while training",
        "(resident set on a CPU, each approach in a fresh process; CUDA memory allocated on a GPU).",
    ]
    return "\n".join([*lines, *_sections(record, _training_table)]) + "\n"


def _training_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns = ("points", "approach", "ms, all points", "images/s", "time / packed", "parameters", "MiB held / peak")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        ms, memory = row["ms"], row.get("memory_mib")
        lines.append(
            f"| {row['adapters']} | {row['approach']} | {ms['median']:.1f} ({ms['q1']:.1f}-{ms['q3']:.1f}) | "
            f"{row['images_per_s']:.1f} | {row['over_packed']:.3f} | {row['parameters'] / 1e6:.2f} M | "
            + ("-" if memory is None else f"{memory['held']:.0f} / {memory['peak']:.0f}")
            + " |"
        )
    return lines


def _sections(record: dict[str, Any], table: Callable[[Sequence[dict[str, Any]]], list[str]]) -> list[str]:
    """A section per configuration, its rows as `table` lays them out."""
    lines: list[str] = []
    for config in dict.fromkeys(row["config"] for row in record["rows"]):
        rows = [row for row in record["rows"] if row["config"] == config]
        lines += ["", f"## {config}: {rows[0]['model']}", "", *table(rows)]
    return lines


def run(
    configs: Sequence[BenchConfig],
    counts: Sequence[int],
    settings: Settings,
    log: Callable[[str], object] = print,
    train: bool = False,
) -> list[dict[str, Any]]:
    rows = []
    for config in configs:
        for count in counts:
            started = time.perf_counter()
            rows += (bench_training if train else bench_count)(config, count, settings)
            log(f"{config.name}, {count} adapter(s): {time.perf_counter() - started:.0f} s")
    return rows


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    header = [
        "adapters",
        "approach",
        "ms/batch",
        "images/s",
        "time / routed",
        "parameters held",
        "MiB built / peak serving",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ms, memory = row["ms"], row.get("memory_mib")
        cells = [
            str(row["adapters"]),
            row["approach"],
            f"{ms['median']:.1f} ({ms['q1']:.1f}-{ms['q3']:.1f})",
            f"{row['images_per_s']:.1f}",
            f"{row['over_routed']:.3f}",
            f"{row['parameters'] / 1e6:.2f} M ({row['parameters'] * 4 / MIB:.0f} MiB fp32)",
            "-" if memory is None else f"{memory['held']:.0f} / {memory['peak']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(record: dict[str, Any]) -> str:
    if record.get("train"):
        return training_markdown(record)
    settings = record["settings"]
    lines = [
        *header(record, "Serving several adapters with one model: routed mixed batches, merged models, switching"),
        f"- settings: rank {settings['rank']}, alpha {settings['alpha']:g}, {settings['precision']}, eval mode under "
        f"torch.inference_mode(); a batch of {record['batch_size']} spread evenly over the adapters in a shuffled "
        f"order; rounds of {settings['steps']} batch(es) per approach in rotating order: {settings['warmup']} "
        f"warm-up, {settings['repeats']} timed; memory over {settings['memory_steps']} batches",
        "",
        "routed: one model holding every adapter, the batch in one pass under `route`. merged: one model per adapter",
        "with it folded into the weights, the batch split by adapter. switching: one model holding every adapter",
        "unmerged, the batch split by adapter and each part run with its adapter set active. ms/batch is the median",
        "with the interquartile range; time / routed > 1 means routed is faster. Parameters held: every parameter of",
        "the models the approach keeps. MiB built / peak serving: what building those models added to the process",
        "(resident set on a CPU, each approach in a fresh process; CUDA memory allocated on a GPU), and the most it",
        "reached while serving batches, above the same starting point.",
    ]
    return "\n".join([*lines, *_sections(record, _table)]) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_vision.bench.multi",
        description="Serve a mixed batch of N adapters: routed in one model, N merged models, or switching.",
    )
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="GLOB", help="LoRA configs")
    parser.add_argument("--adapters", nargs="+", type=positive_int, default=list(ADAPTER_COUNTS), metavar="N")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 runs under autocast")
    parser.add_argument("--batch-size", type=positive_int, help=f"images per mixed batch (default {SERVING_BATCH})")
    parser.add_argument("--steps", type=positive_int, help="batches per timed sample (default 1)")
    parser.add_argument("--repeats", type=positive_int, help="timed rounds, in rotating order (default 5)")
    parser.add_argument("--warmup", type=non_negative_int, help="untimed rounds first (default 1)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurements")
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 warm-up and 2 timed rounds (for tests)")
    parser.add_argument("--train", action="store_true", help="a packed N-point training step against N separate ones")
    parser.add_argument("--out", type=Path, help=f"write DIR/{OUT_NAME}.md (or {TRAIN_OUT_NAME}.md) and .json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    settings = settings_from(args, Settings(warmup=1, repeats=2))
    if torch.device(settings.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    try:
        configs = select_configs(args.configs)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    baselines = [config.name for config in configs if not config.targets]
    if baselines:
        raise SystemExit(f"--configs {baselines} train no adapters; choose LoRA configurations")
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    rows = run(configs, sorted(set(args.adapters)), settings, train=args.train)
    record = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "lora_vision.bench.multi", *argv]),
        "wall_s": time.perf_counter() - started,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "machine": machine(settings),
        "settings": dataclasses.asdict(settings),
        "batch_size": batch_size(settings),
        "train": args.train,
        "rows": rows,
    }
    name = TRAIN_OUT_NAME if args.train else OUT_NAME
    text = markdown(record)
    if args.out:
        write_atomic(args.out / f"{name}.md", text)
        write_json_atomic(args.out / f"{name}.json", record)
        print(f"wrote {args.out / name}.md and .json")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
