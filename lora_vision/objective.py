"""The run's objective, defined once: which validation metric picks the tested epoch, which way is better, and
what a sweep optimises.

The `objective` config block (conf/train.yaml) is read by everything that ranks epochs or runs: the checkpoint
callback (`callbacks.model_checkpoint.monitor`/`mode` interpolate `objective.metric`/`objective.mode`), the tested
epoch (`select`), a search's pruner (it is told the same score per epoch that the search is told at the end),
`results.json` (`objective`, `objective_metric`, `objective_epoch`, ...) and the Optuna sweeper (its direction
follows `objective.mode`), as lightning-hydra-template's `optimized_metric` is one key for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import lightning as L

from lora_vision.errors import UserError

MODES = ("max", "min")
SELECTS = ("best", "last")
DIRECTIONS = {"max": "maximize", "min": "minimize"}


class ObjectiveError(UserError, ValueError):
    """An `objective` setting that cannot work."""


@dataclass(frozen=True)
class Objective:
    """What ranks epochs and runs.

    Attributes:
        metric: a metric the module logs once per validation epoch (`val/acc1`, `val/acc5`, `val/loss`).
        mode: `max` or `min`: which way the metric is better.
        select: `best` tests the epoch with the best metric; `last` tests the last epoch (the VTAB-1k protocol,
            where no held-out split picks an epoch); the objective is the metric at that epoch either way.
        param_penalty: what each tenfold increase in trainable parameters must buy, in the metric's units: the
            score is `metric - param_penalty * log10(trainable_params)` for `max` (`+` for `min`). The
            logarithm, because budgets span orders of magnitude (thousands for a rank-1 adapter, ~1e8 for full
            fine-tuning); 0.01 on `val/acc1` is one percentage point per decade.
        pareto: a sweep is told two values, `[metric, trainable_params]` (the metric in its mode, parameters
            down), instead of the penalised score.
    """

    metric: str = "val/acc1"
    mode: str = "max"
    select: str = "best"
    param_penalty: float = 0.0
    pareto: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric.startswith("val/"):
            raise ObjectiveError(
                f"objective.metric={self.metric!r}: give a validation metric the run logs every epoch "
                "(val/acc1, val/acc5 or val/loss)"
            )
        for key, valid in (("mode", MODES), ("select", SELECTS)):
            if getattr(self, key) not in valid:
                raise ObjectiveError(f"objective.{key}={getattr(self, key)!r}: give one of {', '.join(valid)}")
        penalty = self.param_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, int | float) or not math.isfinite(penalty):
            raise ObjectiveError(f"objective.param_penalty={penalty!r}: give a finite number (0 for none)")
        if not isinstance(self.pareto, bool):
            raise ObjectiveError(f"objective.pareto={self.pareto!r}: give true or false")

    @classmethod
    def from_config(cls, settings: Mapping[str, Any]) -> Objective:
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise ObjectiveError(f"objective has no key {unknown[0]!r}; valid: {', '.join(valid)}")
        return cls(**settings)

    @property
    def direction(self) -> str:
        """Optuna's name for `mode`."""
        return DIRECTIONS[self.mode]

    def directions(self) -> list[str]:
        """The direction of each value a sweep is told."""
        return [self.direction, "minimize"] if self.pareto else [self.direction]

    def better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def score(self, value: float, trainable_params: int) -> float:
        """The metric with the parameter penalty applied in the metric's better direction."""
        sign = 1.0 if self.mode == "max" else -1.0
        return value - sign * self.param_penalty * math.log10(max(trainable_params, 1))

    def sweep_value(self, value: float | None, trainable_params: int) -> float | list[float] | None:
        """What a sweeper is told for a run whose selected epoch has `value`; None when there is none."""
        if value is None or not math.isfinite(value):
            return None
        if self.pareto:
            return [value, float(trainable_params)]
        return self.score(value, trainable_params)

    def selected(self, history: Mapping[int, float]) -> tuple[int, float] | None:
        """The (epoch, metric value) `select` picks from per-epoch values; ties go to the earlier epoch."""
        finite = {epoch: value for epoch, value in history.items() if math.isfinite(value)}
        if not finite:
            return None
        if self.select == "last":
            last = max(history)
            return (last, history[last]) if last in finite else None
        best = min(finite)
        for epoch in sorted(finite):
            if self.better(finite[epoch], finite[best]):
                best = epoch
        return best, finite[best]


class ValidationHistory(L.Callback):
    """Every epoch's validation metrics, kept in the checkpoints so that a resumed run still knows them.

    The record's `best_val_acc1` and the objective's epoch come from here rather than from the checkpoint
    callback's best score, which exists only for its own monitor and not at all when it is switched off.
    """

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, float]] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.epochs[trainer.current_epoch] = {
            key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")
        }

    def values(self, metric: str) -> dict[int, float]:
        return {epoch: metrics[metric] for epoch, metrics in self.epochs.items() if metric in metrics}

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": {str(epoch): metrics for epoch, metrics in self.epochs.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = {int(epoch): dict(metrics) for epoch, metrics in state_dict["epochs"].items()}

    def record(self, objective: Objective, trainable_params: int) -> dict[str, Any]:
        """The record fields: the best `val/acc1`, the objective's metric, epoch, value and sweep score."""
        accuracy = [v for v in self.values("val/acc1").values() if math.isfinite(v)]
        picked = objective.selected(self.values(objective.metric))
        epoch, value = picked if picked is not None else (None, None)
        return {
            "best_val_acc1": max(accuracy) if accuracy else None,
            "objective_metric": objective.metric,
            "objective_mode": objective.mode,
            "objective_select": objective.select,
            "objective_epoch": epoch,
            "objective_metric_value": value,
            "objective": objective.sweep_value(value, trainable_params),
        }
