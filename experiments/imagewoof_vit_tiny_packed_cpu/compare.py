"""The tables of the packed Imagewoof study (run.sh): the packed rank sweep against the same sweep run sequentially
and against the committed study's numbers, with wall times and peak memory; then every row over seeds 42, 1 and 2.

Usage: python compare.py OUT COMMITTED_REPORT_CSV > results.md
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path


def records(sweep: Path) -> list[dict]:
    """Every job's results.json in a multirun directory (not a pack's own summary, in .pack-*/)."""
    return [json.loads(path.read_text()) for path in sorted(sweep.glob("[0-9]*/results.json"))]


def point(record: dict) -> tuple[str, int]:
    return ",".join(record["targets"]), int(record["rank"])


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def timing(out: Path, name: str) -> tuple[float, float]:
    """(wall time in s, peak RSS in MiB) of one multirun, as /usr/bin/time wrote them."""
    seconds, kib = (out / f"{name}.time").read_text().split()[-2:]
    return float(seconds), int(kib) / 1024


def committed_rows(path: Path) -> dict[tuple[str, int], dict]:
    """The committed study's LoRA rows at 112 px (all blocks, plain LoRA), by (targets, rank)."""
    rows = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if (
                row["method"] == "lora"
                and row["variant"] == "lora"
                and row["image_size"] == "112"
                and not row["blocks"]
            ):
                rows[row["targets"], int(row["rank"])] = row
    return rows


def main(out: Path, committed_csv: Path) -> None:
    committed = committed_rows(committed_csv)
    packed = {point(r): r for r in records(out / "rank_packed")}
    sequential = {point(r): r for r in records(out / "rank_sequential")}
    again = {point(r): r for r in records(out / "rank_packed_again")}
    print("## The rank sweep, packed and sequential (seed 42)\n")
    print("| q,v rank | committed study | sequential, this run | packed | packed run again |")
    print("|---|---|---|---|---|")
    for key in sorted(packed, key=lambda k: k[1]):
        row = committed.get(key)
        known = row is not None and row["test_acc1_n"] == "1"
        shown = pct(float(row["test_acc1_mean"])) if known else "(3-seed mean only)"
        cells = [pct(runs[key]["test_acc1"]) for runs in (sequential, packed, again)]
        print(f"| {key[1]} | {shown} | {' | '.join(cells)} |")
    same = sum(packed[k]["test_acc1"] == sequential[k]["test_acc1"] for k in packed)
    print(f"\nTest top-1 (%) on the 3,929 test images. Packed equals sequential in {same} of {len(packed)} points.\n")
    print("| multirun | wall time (s) | peak RSS (MiB) |")
    print("|---|---|---|")
    for name in ("rank_sequential", "rank_packed", "rank_packed_again"):
        seconds, mib = timing(out, name)
        print(f"| {name} | {seconds:.0f} | {mib:,.0f} |")
    ratio = timing(out, "rank_sequential")[0] / timing(out, "rank_packed")[0]
    print(f"\nSequential / packed wall time: {ratio:.2f}x.\n")

    print("## Every row over seeds 42, 1 and 2 (packed)\n")
    by_point: dict[tuple[str, int], dict[int, dict]] = {}
    for sweep in ("rank_packed", "rank_packed_seeds", "budget_packed_seeds"):
        for record in records(out / sweep):
            by_point.setdefault(point(record), {})[record["seed"]] = record
    committed_head = "committed (seed 42, or mean ± std)"
    print(f"| targets | rank | trainable params | seed 42 | seed 1 | seed 2 | mean ± std | {committed_head} |")
    print("|---|---|---|---|---|---|---|---|")
    for key, seeds in sorted(by_point.items(), key=lambda item: (item[0][0] != "qv", item[0])):
        accs = [seeds[seed]["test_acc1"] for seed in (42, 1, 2) if seed in seeds]
        spread = f"{pct(statistics.mean(accs))} ± {pct(statistics.stdev(accs))}" if len(accs) > 1 else ""
        row = committed.get(key)
        shown = ""
        if row is not None:
            shown = pct(float(row["test_acc1_mean"]))
            if row["test_acc1_n"] != "1":
                shown += f" ± {pct(float(row['test_acc1_std']))} (n={row['test_acc1_n']})"
        params = next(iter(seeds.values()))["trainable_params"]
        cells = [pct(seeds[seed]["test_acc1"]) if seed in seeds else "" for seed in (42, 1, 2)]
        print(f"| {key[0]} | {key[1]} | {params:,} | {' | '.join(cells)} | {spread} | {shown} |")
    print("\nTest top-1 (%); std is the sample standard deviation over the three seeds.")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
