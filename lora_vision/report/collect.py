"""Reading run records and aggregating repeated seeds into one row per configuration."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_vision.errors import MissingInputError, UserError
from lora_vision.lora.config import RECORDED
from lora_vision.lora.variants import VARIANTS
from lora_vision.results import RESULTS_FILE


class ReportInputError(UserError, ValueError):
    """A results file the report reads is unreadable."""


# The order a reader expects: the cheapest baseline, the adapters, then the most expensive baseline.
METHOD_ORDER = {"linear_probe": 0, "bitfit": 1, "lora": 2, "full": 3}
BASELINE_LABELS = {"linear_probe": "linear probe", "bitfit": "BitFit", "full": "full fine-tuning"}
VARIANT_LABELS = {"lora": "LoRA", **{v.name: v.label for v in VARIANTS}, "loraplus": "LoRA+"}

# Fields that describe what was run (the LoRA ones from LoraConfig; `task` and `protocol` of datasets with several
# tasks, such as VTAB-1k; an Optuna search's `trial` number). Runs equal in all of them except the seed form one
# row, so every search trial is a row of its own.
CONFIG_FIELDS = (
    "experiment",
    "model",
    "data",
    "task",
    "protocol",
    "image_size",
    "method",
    *RECORDED,
    "lr",
    "batch_size",
    "max_epochs",
    "trial",
)
# Described by each row's config too, without telling rows apart: the metric a run's `objective` was computed from,
# which runs written before results files recorded it lack.
OBJECTIVE_METRIC = "objective_metric"
# The `status` of a run stopped by a NaN/inf training loss (lora_vision.callbacks.FiniteLoss), and of a search
# trial stopped by the study's pruner (lora_vision.search.pruning).
DIVERGED = "diverged"
PRUNED = "pruned"
# `objective`: the run's objective value, what an Optuna search optimises, in its metric's own unit; absent from
# results files written before runs recorded it.
METRICS = (
    "best_val_acc1",
    "test_acc1",
    "test_acc5",
    "wall_time_s",
    "trainable_params",
    "trainable_percent",
    "objective",
)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of one metric over a configuration's successful runs."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[Any]) -> Stat:
        # Anything but a finite number (missing, NaN, the list of values of a two-objective search) is no value.
        finite = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
        if not finite:
            return cls(None, None, 0)
        return cls(statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None, len(finite))


@dataclass
class Row:
    """One configuration: its settings, the aggregated metrics and what went wrong in failed runs."""

    config: dict[str, Any]
    metrics: dict[str, Stat]
    runs: int
    seeds: list[Any]
    failures: list[str] = field(default_factory=list)
    # `status` of each run that did not complete, in the order of `failures`.
    statuses: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.metrics["test_acc1"].n > 0 or self.metrics["best_val_acc1"].n > 0

    @property
    def outcome(self) -> str:
        """What a row without results shows: `diverged` when every run that did not complete diverged (too high a
        learning rate, a finding of the sweep), `pruned` when the search stopped them all early, else `failed`."""
        for status in (DIVERGED, PRUNED):
            if self.statuses and all(s == status for s in self.statuses):
                return status
        return "failed"

    @property
    def label(self) -> str:
        """The series a row belongs to in the plot: method (LoRA variant) and target set."""
        c = self.config
        if c["method"] != "lora":
            return BASELINE_LABELS.get(c["method"], str(c["method"]))
        variant = "+".join(VARIANT_LABELS.get(v, v) for v in str(c.get("variant") or "lora").split("+"))
        blocks = f", blocks {c['blocks']}" if c.get("blocks") not in (None, "") else ""
        return f"{variant} {c['targets']}{blocks}"


def _text(value: Any) -> Any:
    # Lists (targets, blocks) and mappings (rank patterns) become stable strings to compare, group and print.
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return "+".join(map(str, value)) if isinstance(value, list) else value


def _completed(record: dict[str, Any]) -> bool:
    return record.get("status") == "completed"


def _failure(record: dict[str, Any]) -> str:
    if record.get("status") == DIVERGED:
        return f"diverged at step {record.get('diverged_at_step')}"
    if record.get("status") == PRUNED:
        return f"pruned by the search after epoch {record.get('pruned_at_epoch')}"
    return str(record.get("error") or record.get("status"))


def _only(values: set[Any]) -> Any:
    return next(iter(values)) if len(values) == 1 else None


def find_results(paths: Sequence[str | Path]) -> list[Path]:
    """Every results.json at or below the given run / multirun directories, in a stable order."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            found.update(path.rglob(RESULTS_FILE))
        else:
            raise MissingInputError(f"{path} does not exist; pass run or multirun directories that hold {RESULTS_FILE}")
    return sorted(found)


def load_records(files: Iterable[Path]) -> list[dict[str, Any]]:
    records = []
    for path in files:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ReportInputError(f"{path} is not valid JSON ({err}); was the run killed while writing it?") from None
        if isinstance(record.get("tasks"), dict):
            # A multi-task run's summary: its tasks' own records, in tasks/<name>/ below it, are the rows.
            continue
        # The model as built (create kwargs, random or pretrained weights) where the record names it.
        records.append({**record, "model": record.get("model_label") or record.get("model"), "_path": str(path)})
    return records


def _sort_key(row: Row) -> tuple:
    c = row.config
    return (
        str(c.get("experiment")),
        str(c.get("model")),
        c.get("image_size") or 0,
        METHOD_ORDER.get(c.get("method"), 9),
        str(c.get("targets")),
        str(c.get("blocks")),
        c.get("rank") or 0,
        c.get("lr") or 0,
        tuple(str(c.get(k)) for k in CONFIG_FIELDS),
    )


def aggregate(records: Iterable[dict[str, Any]]) -> list[Row]:
    """Group records by configuration; metrics are averaged over the runs that completed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        key = tuple(_text(record.get(f)) for f in CONFIG_FIELDS)
        groups.setdefault(key, []).append(record)
    rows = []
    for key, members in groups.items():
        done = [r for r in members if _completed(r)]
        scored = {r.get(OBJECTIVE_METRIC) for r in done if r.get("objective") is not None}
        rows.append(
            Row(
                # One metric, or None when the runs' objectives disagree in it or name none.
                config={**dict(zip(CONFIG_FIELDS, key, strict=True)), OBJECTIVE_METRIC: _only(scored)},
                metrics={m: Stat.of(r.get(m) for r in done) for m in METRICS},
                runs=len(members),
                seeds=sorted((r.get("seed") for r in members), key=str),
                failures=[
                    f"{r.get('_path') or r.get('output_dir')}: {_failure(r)}" for r in members if not _completed(r)
                ],
                statuses=[str(r.get("status")) for r in members if not _completed(r)],
            )
        )
    return sorted(rows, key=_sort_key)


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by any point that has at most as many parameters and higher accuracy."""
    front: list[tuple[float, float]] = []
    for params, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((params, acc))
    return front
