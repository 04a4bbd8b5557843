"""Accuracy-versus-trainable-parameters reports over run and sweep directories.

`python -m lora_vision.report DIR... [--out OUT]` reads every `results.json` below the given directories and
writes `report.md`, `report.csv` and `report.png` (see `build_report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_vision.errors import MissingInputError
from lora_vision.report.collect import Row, aggregate, find_results, load_records
from lora_vision.report.plot import plot
from lora_vision.report.table import markdown, to_csv
from lora_vision.results import write_atomic


@dataclass(frozen=True)
class Report:
    rows: list[Row]
    markdown: Path
    csv: Path
    png: Path


def build_report(paths: list[str | Path], out_dir: str | Path, title: str | None = None) -> Report:
    """Aggregate the runs below `paths` and write the table (Markdown, CSV) and plot into `out_dir`."""
    files = find_results(paths)
    if not files:
        raise MissingInputError(f"no results.json below {', '.join(map(str, paths))}")
    rows = aggregate(load_records(files))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heading = f"# {title}\n\n" if title else ""
    md = write_atomic(out / "report.md", heading + markdown(rows))
    csv = write_atomic(out / "report.csv", to_csv(rows))
    return Report(rows, md, csv, plot(rows, out / "report.png", title))


__all__ = ["Report", "build_report"]
