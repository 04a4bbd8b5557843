"""Callbacks the run record needs: throughput and divergence."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lora_vision.errors import UserError


class TrainThroughput(L.Callback):
    """Training images per second over the whole fit, validation excluded, summed over all devices.

    Lightning's `ThroughputMonitor` reports windowed per-step rates to the loggers only; the run record needs
    one whole-run average that includes data loading, which this stopwatch gives.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._started: float | None = None
        self._paused_for_validation = False

    @property
    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def _start(self) -> None:
        self._started = time.perf_counter()

    def _stop(self) -> bool:
        if self._started is None:
            return False
        self.seconds += time.perf_counter() - self._started
        self._started = None
        return True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # (images, labels), or a multi-task run's (task, (images, labels)).
        labels = batch[1][1] if isinstance(batch[1], tuple | list) else batch[1]
        self.images += len(labels) * trainer.world_size

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The sanity check runs before the first training epoch, when the stopwatch is not running.
        self._paused_for_validation = self._stop()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused_for_validation:
            self._paused_for_validation = False
            self._start()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()


class DivergedError(UserError, RuntimeError):
    """The training loss became NaN or infinite: the learning rate (or the data) made the run diverge."""

    def __init__(self, step: int, epoch: int, loss: float) -> None:
        self.step = step
        super().__init__(
            f"training loss is {loss} at step {step} (epoch {epoch}): the run diverged and stopped before updating "
            "the weights with it, so checkpoints hold finite weights; lower optim.lr or clip gradients "
            "(trainer.gradient_clip_val)"
        )


class FiniteLoss(L.Callback):
    """Stops the run at the first NaN/inf training loss, before its backward pass and optimizer step.

    Checked before the update, the weights (and so every checkpoint) stay those of the last good step.
    `EarlyStopping(check_finite=True)` looks only at the monitored validation metric, an epoch late, and
    `detect_anomaly` slows every backward pass several times over; one `isfinite` per step costs nothing measurable.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise DivergedError(trainer.global_step, trainer.current_epoch, float(loss.detach()))


def ended_by(err: BaseException) -> dict[str, Any]:
    """The record fields of a run that `err` ended: diverged (at its step), interrupted by SIGTERM, or failed."""
    if isinstance(err, DivergedError):
        return {"status": "diverged", "diverged_at_step": err.step, "error": f"{type(err).__name__}: {err}"}
    if isinstance(err, SIGTERMException):
        return {"status": "interrupted", "error": "SIGTERM; resume with resume=true in the same run directory"}
    return {"status": "failed", "error": f"{type(err).__name__}: {err}"}
