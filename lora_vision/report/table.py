"""The report's table, as Markdown for people and CSV for further analysis."""

from __future__ import annotations

import csv
import io

from lora_vision.report.collect import Row, Stat

# (header, config field or metric, kind); kind says how a cell is written.
COLUMNS = (
    ("model", "model", "config"),
    ("method", "method", "config"),
    ("variant", "variant", "config"),
    ("targets", "targets", "config"),
    ("blocks", "blocks", "config"),
    ("rank", "rank", "config"),
    ("alpha", "alpha", "config"),
    ("trainable params", "trainable_params", "count"),
    ("trainable %", "trainable_percent", "percent"),
    ("best val acc1 (%)", "best_val_acc1", "accuracy"),
    ("test acc1 (%)", "test_acc1", "accuracy"),
    ("test acc5 (%)", "test_acc5", "accuracy"),
    ("time (s)", "wall_time_s", "seconds"),
)


def _blank(value: object) -> str:
    return "" if value is None else str(value)


def _cell(row: Row, field: str, kind: str) -> str:
    if kind == "config":
        return _blank(row.config.get(field))
    stat: Stat = row.metrics[field]
    if stat.mean is None:
        return row.outcome if not row.ok and kind == "accuracy" else ""
    scale, fmt = {"count": (1, "{:,.0f}"), "percent": (1, "{:.3f}"), "accuracy": (100, "{:.2f}")}.get(
        kind, (1, "{:.0f}")
    )
    text = fmt.format(stat.mean * scale)
    # Parameter counts and shares are fixed by the configuration; only measured values get a spread.
    return text if stat.std is None or kind in ("count", "percent") else f"{text} ± {fmt.format(stat.std * scale)}"


def markdown(rows: list[Row]) -> str:
    """A Markdown table, one row per configuration, then the errors of failed runs."""
    lines = [
        "| " + " | ".join([h for h, _, _ in COLUMNS] + ["runs"]) + " |",
        "|" + "|".join(["---"] * (len(COLUMNS) + 1)) + "|",
    ]
    for row in rows:
        cells = [_cell(row, f, k) for _, f, k in COLUMNS]
        runs = f"{row.runs}" + (f" ({len(row.failures)} {row.outcome})" if row.failures else "")
        lines.append("| " + " | ".join([*cells, runs]) + " |")
    failures = [f for row in rows for f in row.failures]
    if failures:
        lines += ["", "Failed runs:", "", *(f"- {f}" for f in failures)]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    """Raw numbers (fractions, not percent) with mean, std and count for each metric."""
    extra = ["rank_pattern", "alpha_pattern", "loraplus_lr_ratio", "experiment", "data", "image_size", "lr"]
    config_fields = [f for _, f, k in COLUMNS if k == "config"] + extra
    metric_fields = [f for _, f, k in COLUMNS if k != "config"]
    header = [*config_fields, *(f"{m}_{s}" for m in metric_fields for s in ("mean", "std", "n")), "runs", "failed"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        stats = [row.metrics[m] for m in metric_fields]
        writer.writerow(
            [
                *(_blank(row.config.get(f)) for f in config_fields),
                *(_blank(v) for s in stats for v in (s.mean, s.std, s.n)),
                row.runs,
                len(row.failures),
            ]
        )
    return out.getvalue()
