"""A test-only callback, added to a training subprocess with `+callbacks.hold._target_=...`, that holds the run at a
known step so a test can signal it there (instead of sleeping and hoping the run is where it should be)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L


class HoldAtStep(L.Callback):
    """After optimizer step `step`, touch `marker` and wait for SIGTERM (or SIGKILL); give up after `timeout_s`."""

    def __init__(self, step: int, marker: str, timeout_s: float = 120.0) -> None:
        self.step = step
        self.marker = Path(marker)
        self.timeout_s = timeout_s

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        self.marker.touch()
        deadline = time.monotonic() + self.timeout_s
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)
