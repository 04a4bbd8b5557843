"""`python -m lora_vision.report DIR... [--out OUT] [--title TITLE]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_vision.errors import user_errors_as_messages
from lora_vision.report import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_vision.report", description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories holding results.json files")
    parser.add_argument("--out", type=Path, help="where to write report.{md,csv,png} (default: the first DIR)")
    parser.add_argument("--title", help="title of the table and plot")
    args = parser.parse_args(argv)
    with user_errors_as_messages(parser.prog):
        report = build_report(args.dirs, args.out or args.dirs[0], args.title)
    print(report.markdown.read_text())
    print(f"wrote {report.markdown}, {report.csv}, {report.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
