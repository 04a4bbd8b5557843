"""Accuracy-versus-trainable-parameters reports over run and sweep directories.

`python -m lora_vision.report DIR... [--out OUT]` reads every `results.json` below the given directories and
writes `report.md`, `report.csv` and `report.png` (see `build_report`); `--from-csv report.csv` redraws a report
from its CSV alone (see `redraw_report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_vision.errors import MissingInputError
from lora_vision.report.collect import Row, aggregate, find_results, load_records
from lora_vision.report.plot import plot
from lora_vision.report.search_front import FrontTrial, front_markdown, load_search_front, search_markdown
from lora_vision.report.table import markdown, rows_from_csv, to_csv
from lora_vision.report.vtab1k import vtab1k_markdown
from lora_vision.results import write_atomic


@dataclass(frozen=True)
class Report:
    rows: list[Row]
    markdown: Path
    csv: Path
    png: Path


def build_report(paths: list[str | Path], out_dir: str | Path, title: str | None = None) -> Report:
    """Aggregate the runs below `paths` and write the table (Markdown, CSV) and plot into `out_dir`.

    Runs of VTAB-1k tasks add the benchmark's table (`lora_vision.report.vtab1k`) to the Markdown; a directory that
    holds a two-objective search's `pareto_front.yaml` adds the search's front to both.
    """
    files = find_results(paths)
    if not files:
        raise MissingInputError(f"no results.json below {', '.join(map(str, paths))}")
    records = load_records(files)
    rows = aggregate(records)
    front = load_search_front([Path(p) for p in paths if Path(p).is_dir()], records)
    return _write(rows, to_csv(rows), front, Path(out_dir), title, search_markdown(paths))


def redraw_report(csv_path: str | Path, out_dir: str | Path, title: str | None = None) -> Report:
    """Write the table and plot of `build_report` from a `report.csv` alone, for reports whose runs are gone.

    The rows, means and standard deviations come from the CSV, which is copied unchanged: the Markdown and the plot
    are those `build_report` writes from the runs, less what a search keeps in its sweep directory rather than in
    the CSV (its sampler and Pareto front). `title` is the heading the report was written with.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist; pass the report.csv of an earlier report")
    text = path.read_text()
    return _write(rows_from_csv(text, str(path)), text, [], Path(out_dir), title)


def _write(
    rows: list[Row], csv_text: str, front: list[FrontTrial], out: Path, title: str | None, search: str = ""
) -> Report:
    out.mkdir(parents=True, exist_ok=True)
    heading = f"# {title}\n\n" if title else ""
    md = write_atomic(
        out / "report.md", heading + markdown(rows) + vtab1k_markdown(rows) + search + front_markdown(front)
    )
    csv = write_atomic(out / "report.csv", csv_text)
    ringed = [(t.trainable_params, 100 * t.test_acc1) for t in front if t.test_acc1 is not None]
    return Report(rows, md, csv, plot(rows, out / "report.png", title, ringed))


__all__ = ["Report", "build_report", "redraw_report"]
