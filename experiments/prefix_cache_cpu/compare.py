"""Compare the cached and uncached sweeps of run.sh: wall times, speed-up, and every run's metrics side by side.

Usage: python experiments/prefix_cache_cpu/compare.py OUT   (prints Markdown and writes OUT/comparison.md)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("best_val_acc1", "test_acc1", "test_acc5", "test_loss")
ADAPTER = Path("adapter") / "adapter.safetensors"


def runs(sweep: Path) -> dict[int, Path]:
    """Job directory of each rank."""
    return {json.loads(p.read_text())["rank"]: p.parent for p in sorted(sweep.glob("*/results.json"))}


def main(out: Path) -> str:
    times = {}
    for line in (out / "sweep_times.txt").read_text().splitlines():
        name, started, ended = line.split()
        times[name] = float(ended) - float(started)
    uncached, cached = runs(out / "uncached"), runs(out / "cached")
    lines = [
        f"Sweep wall time: uncached {times['uncached']:.0f} s, cached {times['cached']:.0f} s, "
        f"speed-up {times['uncached'] / times['cached']:.2f}x",
        "",
        "| rank | run time uncached (s) | run time cached (s) | cache | "
        + " | ".join(f"{m} uncached / cached" for m in METRICS)
        + " | largest difference | adapter file identical |",
        "|---" * (6 + len(METRICS)) + "|",
    ]
    for rank in sorted(uncached):
        plain, fast = (json.loads((sweep[rank] / "results.json").read_text()) for sweep in (uncached, cached))
        cache = fast["prefix_cache"]
        values = " | ".join(f"{plain[m]:.6f} / {fast[m]:.6f}" for m in METRICS)
        difference = max(abs(plain[m] - fast[m]) for m in METRICS)
        same_adapter = (uncached[rank] / ADAPTER).read_bytes() == (cached[rank] / ADAPTER).read_bytes()
        lines.append(
            f"| {rank} | {plain['wall_time_s']:.1f} | {fast['wall_time_s']:.1f} | "
            f"{'hit' if cache['hit'] else 'miss'} ({cache['seconds']:.1f} s, depth {cache['depth']}) | {values} | "
            f"{difference:.3g} | {'yes' if same_adapter else 'no'} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
