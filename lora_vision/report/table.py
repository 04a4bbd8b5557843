"""The report's table, as Markdown for people and CSV for further analysis, and the CSV read back into rows."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

from lora_vision.lora.config import RECORDED
from lora_vision.report.collect import CONFIG_FIELDS, METRICS, OBJECTIVE_METRIC, ReportInputError, Row, Stat

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
# Settings and metrics written to the CSV besides those of COLUMNS: everything that tells rows apart, so that the
# CSV alone can rebuild the report (`rows_from_csv`).
CSV_CONFIG = (
    "experiment",
    "data",
    "task",
    "protocol",
    "image_size",
    "lr",
    "batch_size",
    "max_epochs",
    "trial",
    OBJECTIVE_METRIC,
)


def readable(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits, in scientific notation with a short exponent below 0.01 and from
    10**digits up.

    1.9351140885595286e-4 reads 1.94e-4, 0.003 reads 3e-3 (as learning rates are written on the command line),
    0.25 and 2.83 read as such, 8.0 reads 8 and 123456.0 reads 1.23e5.
    """
    text = f"{value:.{digits}g}"
    if "e" in text or (value != 0 and abs(value) < 0.01):
        mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
        return f"{mantissa}e{int(exponent)}"
    return text


def _blank(value: object) -> str:
    return "" if value is None else str(value)


def _shown(value: object) -> str:
    # The CSV keeps every digit; the Markdown table rounds settings such as 0.00019351140885595286.
    return readable(value) if isinstance(value, float) else _blank(value)


FORMATS: dict[str, Callable[[float], str]] = {
    "count": "{:,.0f}".format,
    "percent": "{:.3f}".format,
    "accuracy": lambda value: f"{100 * value:.2f}",
    "seconds": "{:.0f}".format,
    "objective": lambda value: readable(value, 4),
}


def _cell(row: Row, field: str, kind: str) -> str:
    if kind == "config":
        return _shown(row.config.get(field))
    stat: Stat = row.metrics[field]
    if stat.mean is None:
        return row.outcome if not row.ok and kind == "accuracy" else ""
    fmt = FORMATS[kind]
    # Parameter counts and shares are fixed by the configuration; only measured values get a spread.
    return fmt(stat.mean) if stat.std is None or kind in ("count", "percent") else f"{fmt(stat.mean)} ± {fmt(stat.std)}"


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


def _columns(rows: list[Row]) -> list[tuple[str, str, str]]:
    """COLUMNS, with the settings that differ between rows after the model, a search's trial number first and its
    objective after the validation accuracy it was computed from."""
    varying = [(h, f, "config") for h, f in VARYING if len({_blank(row.config.get(f)) for row in rows}) > 1]
    columns = [COLUMNS[0], *varying, *COLUMNS[1:]]
    if any(row.config.get("trial") is not None for row in rows):
        columns.insert(0, ("trial", "trial", "config"))
    scored = [row for row in rows if row.metrics["objective"].n]
    # The objective of a plain run is its best validation accuracy, already a column; it earns one of its own in a
    # search, or where it is something else (a penalty, another metric, the last epoch's value).
    searched = any(row.config.get("trial") is not None for row in rows)
    if scored and (
        searched or any(row.metrics["objective"].mean != row.metrics["best_val_acc1"].mean for row in scored)
    ):
        metrics = {row.config.get(OBJECTIVE_METRIC) for row in scored}
        header = f"objective ({metrics.pop()})" if len(metrics) == 1 and None not in metrics else "objective"
        after = next(i for i, (_, f, _) in enumerate(columns) if f == "best_val_acc1")
        columns.insert(after + 1, (header, "objective", "objective"))
    return columns


def markdown(rows: list[Row]) -> str:
    """A Markdown table, one row per configuration, then the errors of failed runs.

    Settings that differ between rows (``VARYING``) get a column after the model; the gap-closed column appears
    when some setting has both the linear probe and full fine-tuning; the rows of an Optuna search get their trial
    number and objective. Settings print to three significant digits (the CSV keeps them whole).
    """
    columns = _columns(rows)
    gaps = gap_closed(rows)
    headers = [h for h, _, _ in columns] + ([GAP_HEADER] if gaps else [])
    lines = ["| " + " | ".join([*headers, "runs"]) + " |", "|" + "|".join(["---"] * (len(headers) + 1)) + "|"]
    for index, row in enumerate(rows):
        cells = [_cell(row, f, k) for _, f, k in columns]
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
    config_fields += CSV_CONFIG
    metric_fields = [f for _, f, k in COLUMNS if k != "config"] + ["objective"]
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


def parse_cell(text: str) -> Any:
    """A CSV cell as the value it was written from: empty is None, then a bool, an int, a float or the text."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def rows_from_csv(text: str, source: str) -> list[Row]:
    """The rows a `report.csv` (`to_csv`) was written from, in its order, to redraw a report without its runs.

    Columns an older report did not write read as empty. The CSV keeps no errors, so rows with runs that did not
    complete are refused; so are rows whose gap closed the CSV's own settings do not reproduce (rows told apart
    by a setting the CSV lacks).
    """
    records = list(csv.DictReader(io.StringIO(text)))
    if not records or "runs" not in records[0]:
        raise ReportInputError(f"{source} is not a report.csv written by python -m lora_vision.report")
    rows = []
    for line, cells in enumerate(records, start=2):
        if int(cells.get("failed") or 0):
            raise ReportInputError(
                f"{source}, line {line}: {cells['failed']} run(s) did not complete and the CSV keeps no errors; "
                "report on the run directories instead"
            )
        rows.append(
            Row(
                config={f: parse_cell(cells.get(f) or "") for f in (*CONFIG_FIELDS, OBJECTIVE_METRIC)},
                metrics={
                    m: Stat(
                        parse_cell(cells.get(f"{m}_mean") or ""),
                        parse_cell(cells.get(f"{m}_std") or ""),
                        int(cells.get(f"{m}_n") or 0),
                    )
                    for m in METRICS
                },
                runs=int(cells["runs"]),
                seeds=[],
            )
        )
    gaps = gap_closed(rows)
    for index, cells in enumerate(records):
        if "gap_closed_percent" in cells and cells["gap_closed_percent"] != _blank(gaps.get(index)):
            raise ReportInputError(
                f"{source}, line {index + 2}: its gap closed ({cells['gap_closed_percent'] or 'none'}) does not "
                "follow from the CSV's rows; they differ in a setting the CSV does not hold"
            )
    return rows
