"""The study's table from its output folder: per run, each task's test accuracy, trainable parameters, wall time and
peak resident memory; and the mixed-batch pass.

    python experiments/multitask_vit_tiny_cpu/table.py OUT > experiments/multitask_vit_tiny_cpu/results.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = {
    "single-task: Imagewoof": "single/woof",
    "single-task: CIFAR-10": "single/cifar",
    "multi-task, independent": "multitask/independent",
    "multi-task, shared": "multitask/shared",
    "multi-task, shared_specific (4 + 4)": "multitask/shared_specific",
}


def timing(out: Path, name: str) -> tuple[str, str]:
    seconds, kib = (out / f"{name}.time").read_text().split()[-2:]
    return f"{float(seconds):.0f}", f"{int(kib) / 1024:.0f}"


def main() -> None:
    out = Path(sys.argv[1])
    lines = [
        "| run | Imagewoof test acc1 | CIFAR-10 test acc1 | trainable params | wall time (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for label, name in RUNS.items():
        record = json.loads((out / name / "results.json").read_text())
        if "tasks" in record:
            accuracy = {task: outcome["test_acc1"] for task, outcome in record["tasks"].items()}
        else:
            accuracy = {"woof" if "woof" in name else "cifar": record["test_acc1"]}
        cells = [f"{accuracy[task]:.2%}" if task in accuracy else "" for task in ("woof", "cifar")]
        seconds, mib = timing(out, name)
        lines.append(f"| {label} | {' | '.join(cells)} | {record['trainable_params']:,} | {seconds} | {mib} |")
    mixed = json.loads((out / "mixed_batch.json").read_text())
    lines += ["", f"Mixed-batch pass ({mixed['mixed_batches']} mixed batches):", ""]
    lines += ["| task | images | acc1, mixed pass | acc1, recorded | equal |", "|---|---|---|---|---|"]
    for task, row in mixed["tasks"].items():
        lines.append(
            f"| {task} | {row['images']} | {row['acc1_mixed_pass']:.4%} | {row['acc1_recorded']:.4%} | {row['equal']} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
