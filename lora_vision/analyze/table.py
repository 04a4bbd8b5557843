"""The analysis tables: CSV with raw numbers for further work, Markdown for people."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from lora_vision.analyze.spectra import SpectrumRow
from lora_vision.analyze.truncate import TruncationRow

# Shown in the Markdown table; the CSV has every singular value.
_SHOWN_VALUES = 8


def threshold_label(threshold: float) -> str:
    """0.9 -> "90", 0.995 -> "99.5": the energy threshold in percent, for column names."""
    return f"{100 * threshold:.10g}"


def _blank(value: object) -> str:
    return "" if value is None else str(value)


def _csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([_blank(cell) for cell in row] for row in rows)
    return out.getvalue()


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _thresholds(rows: Sequence[SpectrumRow]) -> list[float]:
    return list(rows[0].effective_ranks) if rows else []


def spectra_csv(rows: Sequence[SpectrumRow]) -> str:
    """One line per layer and slot; columns s1..sN hold the singular values (blank beyond a slot's own)."""
    thresholds = _thresholds(rows)
    width = max((len(row.singular_values) for row in rows), default=0)
    header = [
        *("layer", "slot", "block", "kind", "variant", "rank", "out_features", "fan_in"),
        *("update_norm", "base_norm", "relative_norm", "top_relative"),
        *(f"effective_rank_{threshold_label(t)}" for t in thresholds),
        *(f"s{i + 1}" for i in range(width)),
    ]
    lines = [
        [
            *(row.layer, row.slot, row.block, row.kind, row.variant, row.rank, row.out_features, row.fan_in),
            *(repr(x) for x in (row.update_norm, row.base_norm, row.relative_norm, row.top_relative)),
            *(row.effective_ranks[t] for t in thresholds),
            *(repr(s) for s in row.singular_values),
        ]
        for row in rows
    ]
    return _csv(header, lines)


def _spectrum_cell(values: Sequence[float]) -> str:
    top = values[0] if values else 0.0
    shown = " ".join(f"{v / top:.2f}" if top else "0" for v in values[:_SHOWN_VALUES])
    return shown + (" ..." if len(values) > _SHOWN_VALUES else "")


def spectra_markdown(rows: Sequence[SpectrumRow]) -> str:
    """The table of per-layer spectra: norms relative to the base weight, effective ranks, s_i / s_1."""
    thresholds = _thresholds(rows)
    header = [
        *("layer", "slot", "block", "kind", "rank", "‖ΔW‖/‖W0‖", "s1/‖W0‖₂"),
        *(f"rank @{threshold_label(t)}%" for t in thresholds),
        "s_i/s_1",
    ]
    lines = [
        [
            *(row.layer, row.slot, _blank(row.block), row.kind, str(row.rank)),
            *(f"{row.relative_norm:.4f}", f"{row.top_relative:.4f}"),
            *(str(row.effective_ranks[t]) for t in thresholds),
            _spectrum_cell(row.singular_values),
        ]
        for row in rows
    ]
    return _markdown(header, lines)


def _metric_names(rows: Sequence[TruncationRow]) -> list[str]:
    return list(dict.fromkeys(name for row in rows for name in row.metrics))


def truncation_csv(rows: Sequence[TruncationRow]) -> str:
    """Raw metrics (accuracies as fractions) against the truncation rank k."""
    metrics = _metric_names(rows)
    header = ["k", "label", "retained_energy", *metrics]
    lines = [[row.k, row.label, row.retained_energy, *(row.metrics.get(m) for m in metrics)] for row in rows]
    return _csv(header, lines)


def _metric_cell(name: str, value: float | None) -> str:
    if value is None:
        return ""
    if name.startswith("acc"):
        return f"{100 * value:.2f}"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.4f}"


def truncation_markdown(rows: Sequence[TruncationRow]) -> str:
    """Accuracy (percent) against k, with the share of update energy each k keeps."""
    metrics = _metric_names(rows)
    header = ["k", "", "energy kept (%)", *(f"{m} (%)" if m.startswith("acc") else m for m in metrics)]
    lines = [
        [
            str(row.k),
            row.label,
            "" if row.retained_energy is None else f"{100 * row.retained_energy:.2f}",
            *(_metric_cell(m, row.metrics.get(m)) for m in metrics),
        ]
        for row in rows
    ]
    return _markdown(header, lines)
