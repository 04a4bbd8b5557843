"""`python -m lora_vision.report DIR... [--out OUT] [--title TITLE]`, or `--from-csv report.csv` instead of DIRs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_vision.errors import user_errors_as_messages
from lora_vision.report import build_report, redraw_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_vision.report", description=__doc__)
    parser.add_argument("dirs", nargs="*", type=Path, help="run or multirun directories holding results.json files")
    parser.add_argument(
        "--from-csv",
        type=Path,
        metavar="CSV",
        help="redraw the table and plot from an earlier report's report.csv instead of run directories",
    )
    parser.add_argument(
        "--out", type=Path, help="where to write report.{md,csv,png} (default: the first DIR, or the CSV's folder)"
    )
    parser.add_argument("--title", help="title of the table and plot")
    args = parser.parse_args(argv)
    if bool(args.dirs) == bool(args.from_csv):
        parser.error("give run or multirun directories, or --from-csv, not both")
    with user_errors_as_messages(parser.prog):
        if args.from_csv:
            report = redraw_report(args.from_csv, args.out or args.from_csv.parent, args.title)
        else:
            report = build_report(args.dirs, args.out or args.dirs[0], args.title)
    print(report.markdown.read_text())
    print(f"wrote {report.markdown}, {report.csv}, {report.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
