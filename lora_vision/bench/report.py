"""The benchmark's record: machine, command, settings and rows, as Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch

from lora_vision.bench.configs import Settings
from lora_vision.bench.peft_side import peft_version
from lora_vision.results import write_atomic, write_json_atomic

# The thresholds a configuration should meet: LoRA within 5% of its floor, at least as fast as PEFT with no more
# memory, merged inference within 2% of the base model.
FLOOR_MAX, PEFT_MIN, MERGED_MAX = 1.05, 1.00, 1.02


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(settings: Settings) -> dict[str, Any]:
    """What decides the numbers: hardware, thread count, software versions, and how busy the machine was."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
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


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


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
                row["peft_peer"] or "-",
                counts,
                _ms(row, "ours"),
                _ms(row, "peft"),
                _ratio(row["peft_over_ours"]),
                _ms(row, "floor"),
                _ratio(row["ours_over_floor"]),
                _ratio(_flop_ratio(row)),
                _mib(row, ("ours", "peft", "floor")),
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
    """Configurations whose `value(row)` misses the threshold, or "none"; rows without the value are skipped."""
    checked = [(row["config"], v) for row in rows if (v := value(row)) is not None]
    if not checked:
        return "not measured"
    missed = [f"{name} ({v:.3f})" for name, v in checked if (v < limit if above else v > limit)]
    return f"{len(checked) - len(missed)}/{len(checked)} met" + (f"; missed: {', '.join(missed)}" if missed else "")


def _memory_ratio(row: dict) -> float | None:
    peaks = row.get("peak_mib") or {}
    if "peft" not in peaks or peaks["peft"] <= 0:
        return None
    return peaks["ours"] / peaks["peft"]


def _thresholds(rows: list[dict]) -> list[str]:
    qv = [row for row in rows if row["peft_peer"] == "whole qkv"]
    inference = [row for row in rows if "inference" in row]
    return [
        f"- ours/floor <= {FLOOR_MAX:.2f}: " + _missed(rows, lambda r: r["ours_over_floor"], FLOOR_MAX, False),
        f"- PEFT/ours >= {PEFT_MIN:.2f}: " + _missed(rows, lambda r: r["peft_over_ours"], PEFT_MIN, True),
        "- peak memory ours/PEFT <= 1.00: " + _missed(rows, _memory_ratio, 1.0, False),
        "- q+v slices vs PEFT whole qkv, PEFT/ours >= 1.00: "
        + _missed(qv, lambda r: r["peft_over_ours"], PEFT_MIN, True),
        f"- merged/base inference <= {MERGED_MAX:.2f}: "
        + _missed(inference, lambda r: r["inference"]["merged_over_base"], MERGED_MAX, False),
    ]


def header(record: dict[str, Any], title: str, versions: str = "") -> list[str]:
    """A benchmark report's first lines: the title, date, command, machine, versions and load average."""
    info = record["machine"]
    device = info.get("gpu", info["cpu"])
    return [
        f"# {title}",
        "",
        f"- date: {record['date']}; wall time {record['wall_s']:.0f} s",
        f"- command: `{record['command']}`",
        f"- device: {info['device']} ({device}); {info['logical_cores']} logical cores, "
        f"{info['torch_threads']} torch threads; {info['platform']}",
        f"- versions: python {info['python']}, torch {info['torch']}, timm {info['timm']}{versions}",
        f"- load average (1 min) at start / end: {record['load_start']:.2f} / {record['load_end']:.2f}",
    ]


def markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    lines = [
        *header(record, "LoRA benchmark: ours vs its floor vs PEFT", f", peft {record['machine']['peft']}"),
        f"- settings: rank {settings['rank']}, alpha {settings['alpha']:g}, dropout {settings['dropout']:g}, "
        f"{settings['precision']}, AdamW; rounds of {settings['steps']} step(s) per side in rotating order: "
        f"{settings['warmup']} warm-up, {settings['repeats']} timed; memory over {settings['memory_steps']} steps",
        "",
        "Times are the median per step in ms, with the interquartile range in parentheses. PEFT/ours > 1 means",
        "ours is faster; ours/floor is the cost above the unavoidable forward + activation backward, and",
        "ideal (FLOPs) is the ratio of their matmul/conv FLOPs, what ours/floor would be with no other overhead.",
        "Peak MiB is what training steps add on top of the built model (activations, gradients, optimizer state).",
        "",
        "## Training step",
        "",
        *_training_table(record["rows"]),
        "",
        "## Inference (eval, batch as above)",
        "",
        *_inference_table(record["rows"]),
        "",
        "## The fused LoRA node against the same math from plain torch ops (ours, Linear adapters)",
        "",
        *_composed_table(record["rows"]),
        "",
        "## Speed and memory options (ours; speed-up = without / with)",
        "",
        *_options_table(record.get("option_rows", [])),
        "",
        "## Thresholds (from the medians above; see README.md on noise)",
        "",
        *_thresholds(record["rows"]),
        "",
    ]
    return "\n".join(lines)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {key: row[key] for key in ("config", "model", "method", "blocks", "peft_peer")}
    flat["targets"] = " ".join(row["targets"])
    flat["batch_size"] = row["batch_size"]
    for side, count in row["trainable"].items():
        flat[f"trainable_{side}"] = count
    for side, stats in row["ms"].items():
        flat.update({f"{side}_ms_{key}": value for key, value in stats.items() if key != "samples"})
    flat["peft_over_ours"] = row["peft_over_ours"]
    flat["ours_over_floor"] = row["ours_over_floor"]
    flat["composed_over_ours"] = row.get("composed_over_ours")
    for side, gflops in row["gflops"].items():
        flat[f"{side}_gflops"] = gflops
    for side, mib in (row.get("peak_mib") or {}).items():
        flat[f"{side}_peak_mib"] = mib
    inference = row.get("inference")
    if inference is not None:
        flat.update({f"inference_{name}_ms": stats["median"] for name, stats in inference["ms"].items()})
        flat.update({f"inference_{key}": value for key, value in inference.items() if key != "ms"})
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
