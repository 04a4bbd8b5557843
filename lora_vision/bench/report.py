"""The benchmark's record: machine, command, settings and rows, as Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import os
import platform
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch

from lora_vision.bench.configs import Settings
from lora_vision.bench.peft_side import peft_version
from lora_vision.config_checks import read_cpuinfo
from lora_vision.results import write_atomic, write_json_atomic

# The thresholds a configuration should meet: LoRA within 5% of its floor, at least as fast as PEFT with no more
# memory, merged inference within 2% of the base model.
FLOOR_MAX, PEFT_MIN, MERGED_MAX = 1.05, 1.00, 1.02


# The flags that decide how fast a CPU runs the benchmark's kernels: vector widths, FMA, native bf16.
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")


def _cpu() -> tuple[str, list[str]]:
    """The CPU's model name and the `VECTOR_FLAGS` it has."""
    info = read_cpuinfo()
    if info is None:
        return platform.processor() or platform.machine(), []
    return info.model, [flag for flag in VECTOR_FLAGS if flag in info.flags]


def machine(settings: Settings) -> dict[str, Any]:
    """What decides the numbers: hardware, thread count, software versions, and how busy the machine was."""
    cpu, flags = _cpu()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft_version(),
        "device": settings.device,
    }
    if torch.device(settings.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(settings.device)
        info["cuda"] = torch.version.cuda
    return info


def _ms(row: dict, side: str) -> str:
    stats = row["ms"].get(side)
    if stats is None:
        return "-"
    return f"{stats['median']:.1f} ({stats['q1']:.1f}-{stats['q3']:.1f})"


def _ratio(value: float | dict | None) -> str:
    """A ratio; measured in several runs, its median with the lowest and highest run in parentheses."""
    if value is None:
        return "-"
    if not isinstance(value, dict):
        return f"{value:.3f}"
    if len(value["runs"]) == 1:
        return f"{value['median']:.3f}"
    return f"{value['median']:.3f} ({value['min']:.3f}-{value['max']:.3f})"


def _worst(value: dict | None, above: bool) -> float | None:
    """The run that comes closest to missing a threshold: the lowest for a minimum, the highest for a maximum."""
    if value is None:
        return None
    return value["min"] if above else value["max"]


def _mib(row: dict, sides: Iterable[str]) -> str:
    peaks = row.get("peak_mib")
    if peaks is None:
        return "-"
    return " / ".join(f"{peaks[side]:.0f}" if side in peaks else "-" for side in sides)


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def _flop_ratio(row: dict) -> float | None:
    gflops = row["gflops"]
    return gflops["ours"] / gflops["floor"] if "floor" in gflops else None


def _training_table(rows: list[dict]) -> list[str]:
    header = [
        "config",
        "model",
        "batch",
        "PEFT peer",
        "trainable ours / PEFT",
        "ours ms/step",
        "PEFT ms/step",
        "PEFT/ours",
        "floor ms/step",
        "ours/floor",
        "ideal (FLOPs)",
        "peak MiB ours / PEFT / floor",
        "memory ours/PEFT",
    ]
    lines = []
    for row in rows:
        trainable = row["trainable"]
        counts = f"{trainable['ours']:,}" + (f" / {trainable['peft']:,}" if "peft" in trainable else "")
        lines.append(
            [
                row["config"],
                row["model"],
                str(row["batch_size"]),
                row["peft_peer"] or (f"none: {row['peft_refuses']}" if row.get("peft_refuses") else "-"),
                counts,
                _ms(row, "ours"),
                _ms(row, "peft"),
                _ratio(row["peft_over_ours"]),
                _ms(row, "floor"),
                _ratio(row["ours_over_floor"]),
                _ratio(_flop_ratio(row)),
                _mib(row, ("ours", "peft", "floor")),
                _ratio(row.get("memory_ratio")),
            ]
        )
    return _table(header, lines)


def _inference_table(rows: list[dict]) -> list[str]:
    header = ["config", "base ms", "merged ms", "merged/base", "unmerged ms", "unmerged/base", "PEFT unmerged ms"]
    header.append("PEFT unmerged/base")
    lines = []
    for row in rows:
        inference = row.get("inference")
        if inference is None:
            continue
        lines.append(
            [
                row["config"],
                _ms(inference, "base"),
                _ms(inference, "merged"),
                _ratio(inference["merged_over_base"]),
                _ms(inference, "unmerged"),
                _ratio(inference["unmerged_over_base"]),
                _ms(inference, "peft_unmerged"),
                _ratio(inference["peft_unmerged_over_base"]),
            ]
        )
    return _table(header, lines)


def _composed_table(rows: list[dict]) -> list[str]:
    header = ("config", "fused ms/step", "composed ms/step", "composed/fused", "fused/floor", "composed/floor")
    header += ("peak MiB fused / composed",)
    lines = [
        (
            row["config"],
            _ms(row, "ours"),
            _ms(row, "composed"),
            _ratio(row["composed_over_ours"]),
            _ratio(row["ours_over_floor"]),
            _ratio(row["composed_over_floor"]),
            _mib(row, ("ours", "composed")),
        )
        for row in rows
        if row.get("composed_over_ours") is not None
    ]
    return _table(header, lines)


def _options_table(rows: list[dict]) -> list[str]:
    header = (
        "config",
        "option",
        "model",
        "batch",
        "without ms/step",
        "with ms/step",
        "speed-up",
        "peak MiB without / with",
    )
    lines = [
        (
            row["config"],
            row["option"],
            row["model"],
            str(row["batch_size"]),
            _ms(row, "without"),
            _ms(row, "with"),
            _ratio(row["speedup"]),
            _mib(row, ("without", "with")),
        )
        for row in rows
    ]
    return _table(header, lines)


def _missed(rows: list[dict], value, limit: float, above: bool) -> str:
    """Configurations where some run of `value(row)` (a ratio over runs) misses the threshold, or "none"; rows
    without the value are skipped."""
    checked = [(row["config"], v) for row in rows if (v := _worst(value(row), above)) is not None]
    if not checked:
        return "not measured"
    missed = [f"{name} ({v:.3f})" for name, v in checked if (v < limit if above else v > limit)]
    return f"{len(checked) - len(missed)}/{len(checked)} met" + (f"; missed: {', '.join(missed)}" if missed else "")


def _thresholds(rows: list[dict]) -> list[str]:
    qv = [row for row in rows if row["peft_peer"] == "whole qkv"]
    inference = [row for row in rows if "inference" in row]
    return [
        f"- ours/floor <= {FLOOR_MAX:.2f}: " + _missed(rows, lambda r: r["ours_over_floor"], FLOOR_MAX, False),
        f"- PEFT/ours >= {PEFT_MIN:.2f}: " + _missed(rows, lambda r: r["peft_over_ours"], PEFT_MIN, True),
        "- peak memory ours/PEFT <= 1.00: " + _missed(rows, lambda r: r.get("memory_ratio"), 1.0, False),
        "- q+v slices vs PEFT whole qkv, PEFT/ours >= 1.00: "
        + _missed(qv, lambda r: r["peft_over_ours"], PEFT_MIN, True),
        f"- merged/base inference <= {MERGED_MAX:.2f}: "
        + _missed(inference, lambda r: r["inference"]["merged_over_base"], MERGED_MAX, False),
    ]


def measured(module: str, argv: Sequence[str], settings: Settings, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The record of `run()` (the rows it returns, by key): when and how long it ran, the command
    (`python -m module argv`), the load average before and after, the machine and the settings."""
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    content = run()
    return {
        "date": date,
        "command": shlex.join(["python", "-m", module, *argv]),
        "wall_s": time.perf_counter() - started,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "machine": machine(settings),
        "settings": dataclasses.asdict(settings),
        **content,
    }


def record_rows(
    module: str,
    argv: Sequence[str],
    settings: Settings,
    rows: Callable[[], list[dict[str, Any]]],
    out: str | None,
    render: Callable[[dict[str, Any]], str],
    stem: str,
) -> None:
    """The `measured` record of a tool's `rows()`, written as `stem`.md (rendered) and `stem`.json into the
    directory `out`, or its markdown printed where there is none."""
    record = measured(module, argv, settings, lambda: {"rows": rows()})
    if out is None:
        print(render(record))
        return
    print(f"wrote {write_atomic(Path(out) / f'{stem}.md', render(record))}")
    print(f"wrote {write_json_atomic(Path(out) / f'{stem}.json', record)}")


def header(record: dict[str, Any], title: str, versions: str = "") -> list[str]:
    """A benchmark report's first lines: the title, date, command, machine, versions and load average."""
    info = record["machine"]
    device = info.get("gpu", info["cpu"])
    return [
        f"# {title}",
        "",
        f"- date: {record['date']}; wall time {record['wall_s']:.0f} s",
        f"- command: `{record['command']}`",
        f"- device: {info['device']} ({device}; flags {' '.join(info.get('cpu_flags') or ['unknown'])}); "
        f"{info['logical_cores']} logical cores, "
        f"{info['torch_threads']} torch threads; {info['platform']}",
        f"- versions: python {info['python']}, torch {info['torch']}, timm {info['timm']}{versions}",
        f"- load average (1 min) at start / end: {record['load_start']:.2f} / {record['load_end']:.2f}",
    ]


def markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    lines = [
        *header(record, "LoRA benchmark: ours vs its floor vs PEFT", f", peft {record['machine']['peft']}"),
        f"- settings: rank {settings['rank']}, alpha {settings['alpha']:g}, dropout {settings['dropout']:g}, "
        f"{settings['precision']}, AdamW; {settings['runs']} run(s) of rounds of {settings['steps']} step(s) per side "
        f"in rotating order: {settings['warmup']} warm-up, {settings['repeats']} timed; memory over "
        f"{settings['memory_steps']} steps, once per run",
        "",
        "Times are the median per step in ms over all runs, with the interquartile range in parentheses. Ratios are",
        "the median of the runs' ratios, with the lowest and highest run in parentheses. PEFT/ours > 1 means",
        "ours is faster; ours/floor is the cost above the unavoidable forward + activation backward, and",
        "ideal (FLOPs) is the ratio of their matmul/conv FLOPs, what ours/floor would be with no other overhead.",
        "Peak MiB is what training steps add on top of the built model (activations, gradients, optimizer state),",
        "the median over runs.",
        "",
        "## Training step",
        "",
        *_training_table(record["rows"]),
        "",
        "## Inference (eval, batch as above)",
        "",
        *_inference_table(record["rows"]),
        "",
        "## The fused LoRA nodes against the same math from plain torch ops (ours)",
        "",
        *_composed_table(record["rows"]),
        "",
        "## Speed and memory options (ours; speed-up = without / with)",
        "",
        *_options_table(record.get("option_rows", [])),
        "",
        "## Thresholds (met only where every run meets them; see README.md on noise)",
        "",
        *_thresholds(record["rows"]),
        "",
    ]
    return "\n".join(lines)


def _flat_ratio(flat: dict[str, Any], key: str, value: dict | None) -> None:
    for part in ("min", "median", "max"):
        flat[f"{key}_{part}"] = None if value is None else value[part]


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {key: row[key] for key in ("config", "model", "method", "blocks", "peft_peer")}
    flat["targets"] = " ".join(row["targets"])
    flat["batch_size"] = row["batch_size"]
    for side, count in row["trainable"].items():
        flat[f"trainable_{side}"] = count
    for side, stats in row["ms"].items():
        flat.update({f"{side}_ms_{key}": value for key, value in stats.items() if key != "samples"})
    for key in ("peft_over_ours", "ours_over_floor", "composed_over_ours"):
        _flat_ratio(flat, key, row.get(key))
    for side, gflops in row["gflops"].items():
        flat[f"{side}_gflops"] = gflops
    for side, mib in (row.get("peak_mib") or {}).items():
        flat[f"{side}_peak_mib"] = mib
    _flat_ratio(flat, "memory_ours_over_peft", row.get("memory_ratio"))
    inference = row.get("inference")
    if inference is not None:
        flat.update({f"inference_{name}_ms": stats["median"] for name, stats in inference["ms"].items()})
        for key, value in inference.items():
            if key.endswith("_over_base"):
                _flat_ratio(flat, f"inference_{key}", value)
    return flat


def to_csv(rows: list[dict[str, Any]]) -> str:
    flat = [_flat(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def write_record(out: str | Path, record: dict[str, Any]) -> list[Path]:
    """results.md, results.csv and results.json under `out`."""
    out = Path(out)
    return [
        write_atomic(out / "results.md", markdown(record)),
        write_atomic(out / "results.csv", to_csv(record["rows"])),
        write_json_atomic(out / "results.json", record),
    ]
