"""The VTAB-1k section of a report: test top-1 per task for each method, the group means and both overall means,
next to published rows.

Papers average VTAB-1k two ways: the plain mean of the 19 tasks (V-PETL Bench's "Mean"), and the mean of the
Natural, Specialized and Structured means, which weights the three groups equally whatever their size (the
"Average" of NOAH's and RepAdapter's tables). The section shows both, labelled.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from lora_vision.data.vtab1k import VTab1kDataModule
from lora_vision.data.vtab1k_tasks import GROUPS, TASK_NAMES, TASKS
from lora_vision.report.collect import CONFIG_FIELDS, Row

DATA_NAME = VTab1kDataModule.__name__


@dataclass(frozen=True)
class VTab1kMeans:
    """The averages of one set of per-task accuracies; None where a task they cover is missing."""

    groups: dict[str, float | None]
    # The plain mean of the 19 tasks.
    tasks: float | None
    # The mean of the three group means.
    of_groups: float | None


def vtab1k_means(accuracy: Mapping[str, float]) -> VTab1kMeans:
    """Group means, the mean of the 19 tasks and the mean of the group means of ``accuracy`` (task name -> value).

    A mean that would miss one of its tasks is None: a partial mean is not comparable with the published ones.
    """
    unknown = sorted(set(accuracy) - set(TASK_NAMES))
    if unknown:
        raise ValueError(f"not VTAB-1k tasks: {unknown}; valid: {', '.join(TASK_NAMES)}")
    groups = {}
    for group in GROUPS:
        members = [task.name for task in TASKS if task.group == group]
        groups[group] = statistics.fmean(accuracy[n] for n in members) if set(members) <= set(accuracy) else None
    complete = len(accuracy) == len(TASK_NAMES)
    group_values = [value for value in groups.values() if value is not None]
    return VTab1kMeans(
        groups=groups,
        tasks=statistics.fmean(accuracy[n] for n in TASK_NAMES) if complete else None,
        of_groups=statistics.fmean(group_values) if len(group_values) == len(GROUPS) else None,
    )


@dataclass(frozen=True)
class PublishedRow:
    """A method's VTAB-1k row as a paper or benchmark prints it."""

    label: str
    # Test top-1 in percent by task name; a task left out is a cell no source we checked gives.
    accuracy: dict[str, float]
    source: str


NOAH = "NOAH (Zhang et al. 2022, arXiv:2206.04673)"
VPETL = "V-PETL Bench (Xin et al. 2024), README of github.com/synbol/Parameter-Efficient-Transfer-Learning-Benchmark"
# Test top-1 (%) in TASKS order: the Natural and Specialized tasks, then the Structured ones.
_FULL = (
    68.9, 87.7, 64.3, 97.2, 86.9, 87.4, 38.8, 79.7, 95.7, 84.2, 73.9,
    56.3, 58.6, 41.7, 65.5, 57.5, 46.7, 25.7, 29.1,
)  # fmt: skip
_LINEAR = (
    63.4, 85.0, 63.2, 97.0, 86.3, 36.6, 51.0, 78.5, 87.5, 68.6, 74.0,
    34.3, 30.6, 33.2, 55.4, 12.5, 20.0, 9.6, 19.2,
)  # fmt: skip
_LORA_NOAH = (
    67.1, 91.4, 69.4, 98.8, 90.4, 85.3, 54.0, 84.9, 95.3, 84.4, 73.6,
    82.9, 69.2, 49.8, 78.5, 75.7, 47.1, 31.0, 44.0,
)  # fmt: skip
PUBLISHED = (
    PublishedRow(
        "full fine-tuning",
        dict(zip(TASK_NAMES, _FULL, strict=True)),
        f"{VPETL}, VTAB table. NOAH's Table 1 quotes the row from VPT (Jia et al. 2022) with Flowers102 at 87.2.",
    ),
    PublishedRow(
        "linear probing",
        dict(zip(TASK_NAMES, _LINEAR, strict=True)),
        f"{VPETL}, VTAB table. NOAH's Table 1 quotes it with CIFAR-100 at 64.4 and Resisc45 at 68.5.",
    ),
    PublishedRow(
        "LoRA r=8, fused qkv (NOAH)",
        dict(zip(TASK_NAMES, _LORA_NOAH, strict=True)),
        f"{NOAH}, Table 1 (figures/table1.jpg of github.com/ZhangYuanhan-AI/NOAH), 0.29 M parameters; the same 19 "
        f"numbers are in {VPETL}. NOAH prints an Average of 74.5, the mean of the group means of its cells is 74.60; "
        "V-PETL Bench prints the mean of the 19, 72.25.",
    ),
)


@dataclass
class _Arm:
    """The rows of one configuration across the tasks: what the section puts on one line."""

    label: str
    rows: dict[str, Row]


# Settings named in a line's label when the report's configurations differ in them (method, targets and rank always
# are, through Row.label).
LABEL_SETTINGS = ("experiment", "model", "image_size", "alpha", "lr", "batch_size", "max_epochs")


def _arm_label(row: Row, varying: list[str]) -> str:
    label = row.label
    if row.config.get("rank") is not None:
        label += f", r={row.config['rank']}"
    named = [f"{field} {row.config[field]}" for field in varying if row.config.get(field) is not None]
    if named:
        label += " (" + ", ".join(named) + ")"
    if row.config.get("protocol") == "tune":
        label += " [tune: scored on val200]"
    return label


def _arms(rows: list[Row]) -> list[_Arm]:
    ours = [row for row in rows if row.config.get("data") == DATA_NAME and row.config.get("task") in TASK_NAMES]
    # Baselines record no LoRA settings (None): that is no difference worth a label.
    varying = [f for f in LABEL_SETTINGS if len({str(r.config[f]) for r in ours if r.config.get(f) is not None}) > 1]
    arms: dict[tuple, _Arm] = {}
    for row in ours:
        key = tuple(str(row.config.get(f)) for f in CONFIG_FIELDS if f != "task")
        arm = arms.setdefault(key, _Arm(_arm_label(row, varying), {}))
        arm.rows[row.config["task"]] = row
    return list(arms.values())


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _line(label: str, cells: Mapping[str, str], means: VTab1kMeans, last: str) -> str:
    values = [label]
    for group in GROUPS:
        values += [cells.get(task.name, "") for task in TASKS if task.group == group]
        values.append(_number(means.groups[group], 2))
    values += [_number(means.tasks, 2), _number(means.of_groups, 2), last]
    return "| " + " | ".join(values) + " |"


def vtab1k_markdown(rows: list[Row]) -> str:
    """The section for the VTAB-1k rows among ``rows`` (one line per configuration); empty when there are none."""
    arms = _arms(rows)
    if not arms:
        return ""
    headers = ["method"]
    for group in GROUPS:
        headers += [task.label for task in TASKS if task.group == group] + [f"{group} mean"]
    headers += ["mean of 19 tasks", "mean of group means", "tasks / source"]
    lines = [
        "",
        "## VTAB-1k",
        "",
        "Test top-1 (%) per task, mean over seeds; group means over each group's tasks; *mean of 19 tasks*: the plain "
        "average of the tasks; *mean of group means*: the average of the Natural, Specialized and Structured means. "
        "A mean is left empty when one of its tasks has no result. Published rows follow ours (ViT-B/16, "
        "ImageNet-21k); their means are computed here from their cells.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * len(headers)) + "|",
    ]
    for arm in arms:
        accuracy = {
            task: 100 * row.metrics["test_acc1"].mean
            for task, row in arm.rows.items()
            if row.metrics["test_acc1"].mean is not None
        }
        cells = {task: _number(value, 1) for task, value in accuracy.items()}
        cells |= {task: row.outcome for task, row in arm.rows.items() if not row.ok}
        lines.append(_line(arm.label, cells, vtab1k_means(accuracy), f"{len(accuracy)}/{len(TASKS)} tasks"))
    for number, row in enumerate(PUBLISHED, start=1):
        cells = {task: _number(value, 1) for task, value in row.accuracy.items()}
        lines.append(_line(f"published: {row.label}", cells, vtab1k_means(row.accuracy), f"[{number}]"))
    lines.append("")
    lines += [f"[{number}] {row.source}" for number, row in enumerate(PUBLISHED, start=1)]
    return "\n".join(lines) + "\n"
