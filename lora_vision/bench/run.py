"""Running the benchmark: per configuration, training-step timings, peak memory and inference timings."""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lora_vision.bench.configs import LORA, BenchConfig, Settings
from lora_vision.bench.flops import step_flops
from lora_vision.bench.memory import peak_memory_mib
from lora_vision.bench.sides import (
    COMPOSED,
    FLOOR,
    OURS,
    PEFT,
    TrainStep,
    build_base,
    build_row,
    inference_step,
    make_batch,
    prepare_side,
    trainable_parameters,
)
from lora_vision.bench.timing import Runs, Spread, time_runs
from lora_vision.lora import merge_and_unload


def _sync(settings: Settings) -> Callable[[], object]:
    if torch.device(settings.device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _timed(calls: dict[str, Callable[[], object]], settings: Settings, warmup: int | None = None) -> Runs:
    warmup = settings.warmup if warmup is None else warmup
    return time_runs(calls, settings.runs, warmup, settings.repeats, settings.steps, _sync(settings))


def _spread(spread: Spread | None) -> dict[str, Any] | None:
    return None if spread is None else spread.as_dict()


def _memory_runs(
    config: BenchConfig, measured: dict[str, tuple[str, Settings]], runs: int, ratio: tuple[str, str] | None
) -> dict[str, Any]:
    """Peak memory of each labelled (side, settings) in every run, a fresh child each time; the medians per label;
    and `ratio` (label over label) run by run."""
    per_run = [
        {label: peak_memory_mib(config, side, settings) for label, (side, settings) in measured.items()}
        for _ in range(runs)
    ]
    spread = None if ratio is None else Spread.of([run[ratio[0]] / run[ratio[1]] for run in per_run])
    return {
        "peak_mib": {label: statistics.median(run[label] for run in per_run) for label in measured},
        "peak_mib_runs": per_run,
        "memory_ratio": _spread(spread),
    }


def _inference(base: nn.Module, models: dict[str, nn.Module], config: BenchConfig, settings: Settings) -> dict:
    """Base vs merged vs unmerged forward passes (eval, inference mode), timed side by side."""
    images, _ = make_batch(settings.model(config), settings)
    candidates = {"base": base, "merged": merge_and_unload(models[OURS]), "unmerged": models[OURS]}
    if PEFT in models:
        candidates["peft_unmerged"] = models[PEFT]
    calls = {name: inference_step(model, images, settings) for name, model in candidates.items()}
    runs = _timed(calls, settings)
    return {
        "ms": {name: s.as_dict() for name, s in runs.pooled.items()},
        "runs_ms": runs.medians,
        "merged_over_base": _spread(runs.ratio("merged", "base")),
        "unmerged_over_base": _spread(runs.ratio("unmerged", "base")),
        "peft_unmerged_over_base": _spread(runs.ratio("peft_unmerged", "base")),
    }


def bench_config(config: BenchConfig, settings: Settings) -> dict[str, Any]:
    """One row: every side built from one model, timed in rotating order; then memory and inference."""
    spec, base, images, labels, models = build_row(config, settings)
    sides = tuple(models)
    calls = {side: TrainStep(model, images, labels, settings) for side, model in models.items()}
    runs = _timed(calls, settings)
    row: dict[str, Any] = {
        "config": config.name,
        "model": spec.label,
        "method": config.method,
        "targets": list(config.targets),
        "blocks": config.blocks,
        "peft_peer": config.peft_peer if PEFT in models else None,
        "peft_refuses": config.peft_refuses or None,
        "batch_size": settings.batch(spec),
        "trainable": {side: trainable_parameters(model) for side, model in models.items()},
        "ms": {side: s.as_dict() for side, s in runs.pooled.items()},
        "runs_ms": runs.medians,
        "peft_over_ours": _spread(runs.ratio(PEFT, OURS)),
        "ours_over_floor": _spread(runs.ratio(OURS, FLOOR)),
        "composed_over_ours": _spread(runs.ratio(COMPOSED, OURS)),
        "composed_over_floor": _spread(runs.ratio(COMPOSED, FLOOR)),
        "gflops": {side: step_flops(config, side, settings) / 1e9 for side in sides},
    }
    del calls  # the optimizers' state; the children below and inference need none of it
    gc.collect()
    if settings.memory:
        ratio = (OURS, PEFT) if PEFT in sides else None
        row.update(_memory_runs(config, {side: (side, settings) for side in sides}, settings.runs, ratio))
    if settings.inference and config.method == LORA:
        row["inference"] = _inference(base, models, config, settings)
    return row


def bench_option(config: BenchConfig, option: str, settings: Settings) -> dict[str, Any]:
    """Our side of `config` with and without one speed or memory option, timed side by side; then memory."""
    spec = settings.model(config)
    base = build_base(spec, settings)
    images, labels = make_batch(spec, settings)
    variants = {"without": settings, "with": settings.with_option(option)}
    calls = {
        name: TrainStep(prepare_side(copy.deepcopy(base), config, OURS, s), images, labels, s)
        for name, s in variants.items()
    }
    # The first round of a compiled model compiles it; more warm-up keeps recompilation out of the timings.
    runs = _timed(calls, settings, warmup=settings.warmup + 1)
    row: dict[str, Any] = {
        "config": config.name,
        "model": spec.label,
        "option": option,
        "batch_size": settings.batch(spec),
        "ms": {name: s.as_dict() for name, s in runs.pooled.items()},
        "runs_ms": runs.medians,
        "speedup": _spread(runs.ratio("without", "with")),
    }
    del calls
    gc.collect()
    if settings.memory:
        measured = {name: (OURS, s) for name, s in variants.items()}
        row.update(_memory_runs(config, measured, settings.runs, ("with", "without")))
    return row


def run_benchmark(
    configs: Sequence[BenchConfig],
    settings: Settings,
    options: Sequence[tuple[BenchConfig, str]] = (),
    log: Callable[[str], object] = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of `configs`, then the option rows; each logged with its wall time as it finishes."""
    rows, option_rows = [], []
    for config in configs:
        spec = settings.model(config)
        started = time.perf_counter()
        rows.append(bench_config(config, settings))
        log(f"{config.name}: {spec.label}, batch {settings.batch(spec)}, {time.perf_counter() - started:.0f} s")
    for config, option in options:
        started = time.perf_counter()
        option_rows.append(bench_option(config, option, settings))
        log(f"{config.name} with {option}: {time.perf_counter() - started:.0f} s")
    return rows, option_rows
