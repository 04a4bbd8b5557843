"""The report's table, as Markdown for people and CSV for further analysis."""

from __future__ import annotations

import csv
import io

from lora_vision.lora.config import RECORDED
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
# Settings shown, after the model, only when a report's rows differ in them (a study at two input sizes, a
# learning-rate search).
VARYING = (
    ("experiment", "experiment"),
    ("task", "task"),
    ("protocol", "protocol"),
    ("image size", "image_size"),
    ("lr", "lr"),
)
# Rows compared with each other's baselines share these settings (not the experiment name: sweeps that name their
# arms, such as a scale rule per arm, still share one probe and one full fine-tuning).
SETTING = ("model", "data", "task", "protocol", "image_size", "max_epochs")
GAP_HEADER = "gap closed (%)"


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


def gap_closed(rows: list[Row]) -> dict[int, float]:
    """Each row's share of the linear-probe-to-full-fine-tuning gap in mean test top-1, in percent, by row index.

    ``(acc - probe) / (full - probe)``: 0 is the probe, 100 is full fine-tuning. Only rows whose setting (the
    ``SETTING`` fields; the learning rate may differ) has both baselines, with full fine-tuning ahead, get one.
    """
    baselines: dict[tuple, dict[str, float]] = {}
    for row in rows:
        acc = row.metrics["test_acc1"].mean
        if row.config.get("method") in ("linear_probe", "full") and acc is not None:
            baselines.setdefault(_setting(row), {})[row.config["method"]] = acc
    gaps = {}
    for index, row in enumerate(rows):
        ends, acc = baselines.get(_setting(row), {}), row.metrics["test_acc1"].mean
        if acc is not None and len(ends) == 2 and ends["full"] > ends["linear_probe"]:
            gaps[index] = 100 * (acc - ends["linear_probe"]) / (ends["full"] - ends["linear_probe"])
    return gaps


def _setting(row: Row) -> tuple:
    return tuple(str(row.config.get(field)) for field in SETTING)


def markdown(rows: list[Row]) -> str:
    """A Markdown table, one row per configuration, then the errors of failed runs.

    Settings that differ between rows (``VARYING``) get a column after the model; the gap-closed column appears
    when some setting has both the linear probe and full fine-tuning.
    """
    varying = [(h, f) for h, f in VARYING if len({_blank(row.config.get(f)) for row in rows}) > 1]
    gaps = gap_closed(rows)
    headers = [COLUMNS[0][0], *(h for h, _ in varying), *(h for h, _, _ in COLUMNS[1:])]
    headers += [GAP_HEADER] if gaps else []
    lines = ["| " + " | ".join([*headers, "runs"]) + " |", "|" + "|".join(["---"] * (len(headers) + 1)) + "|"]
    for index, row in enumerate(rows):
        cells = [_cell(row, f, k) for _, f, k in COLUMNS]
        cells[1:1] = [_blank(row.config.get(f)) for _, f in varying]
        if gaps:
            cells.append(f"{gaps[index]:.0f}" if index in gaps else "")
        runs = f"{row.runs}" + (f" ({len(row.failures)} {row.outcome})" if row.failures else "")
        lines.append("| " + " | ".join([*cells, runs]) + " |")
    failures = [f for row in rows for f in row.failures]
    if failures:
        lines += ["", "Runs that did not complete:", "", *(f"- {f}" for f in failures)]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    """Raw numbers (fractions, not percent) with mean, std and count for each metric."""
    config_fields = [f for _, f, k in COLUMNS if k == "config"]
    config_fields += [f for f in RECORDED if f not in config_fields]
    config_fields += ["experiment", "data", "task", "protocol", "image_size", "lr"]
    metric_fields = [f for _, f, k in COLUMNS if k != "config"]
    header = [*config_fields, *(f"{m}_{s}" for m in metric_fields for s in ("mean", "std", "n"))]
    header += ["gap_closed_percent", "runs", "failed"]
    gaps = gap_closed(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for index, row in enumerate(rows):
        stats = [row.metrics[m] for m in metric_fields]
        writer.writerow(
            [
                *(_blank(row.config.get(f)) for f in config_fields),
                *(_blank(v) for s in stats for v in (s.mean, s.std, s.n)),
                _blank(gaps.get(index)),
                row.runs,
                len(row.failures),
            ]
        )
    return out.getvalue()
