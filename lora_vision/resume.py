"""Interruption and resume: a resume checkpoint, RNG states, atomic checkpoint files.

A run killed at any point resumes from `<run dir>/checkpoints/last.ckpt`. Lightning restores the weights, the
optimizer, the LR schedule and the loop counters; what it does not restore for a plain DataLoader is the position
inside the epoch and the shuffling order, which the datamodules' `ResumableDataLoader` adds
(`lora_vision.data.resumable`): the loader remembers the sampler generator's state at the start of each pass and,
after a resume, replays that pass and skips the batches already trained on. Global RNG states (torch, numpy,
python) are saved by `ResumeCheckpoint` and restored when training restarts. What stays inexact (random
augmentation, the interrupted epoch's training metrics) is listed in the README, "Interruption and resume".
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from lora_vision.config_checks import ConfigError
from lora_vision.data.resumable import TracksPosition
from lora_vision.models import weights_file_damage
from lora_vision.results import NEW_FILE_MODE

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file beside the target, then `os.replace` it over the target.

    Lightning writes the final path directly (truncate, then write), so a kill during the write leaves a truncated
    `last.ckpt` that breaks the resume it was meant for. A rename is atomic on one filesystem: readers see the old
    file or the new one, never half of one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.fchmod(fd, NEW_FILE_MODE)
        os.close(fd)
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def rng_states() -> dict[str, Any]:
    # Plain types and tensors only: Lightning loads checkpoints with `weights_only=True`, which refuses numpy arrays.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, keys.tolist(), pos, has_gauss, gauss)
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeCheckpoint(Checkpoint):
    """Writes `<dirpath>/last.ckpt` for resuming, separately from best-model selection.

    It saves after every training epoch, every `every_n_train_steps` optimizer steps (null: only at epoch ends) and
    when SIGTERM stops the run (SLURM pre-emption, `scancel`), so a resume repeats at most that many steps.
    `ModelCheckpoint(save_last=True)` refreshes `last.ckpt` only when it saves a top-k checkpoint, which leaves it
    stale, and Lightning saves nothing on SIGTERM.

    A `Checkpoint` subclass, so Lightning calls its epoch-end hook among the checkpoint callbacks, after
    `ModelCheckpoint` has saved that epoch's best (the run lists it after `ModelCheckpoint`): a `last.ckpt` written
    before would record the previous best file, which `ModelCheckpoint` deletes a moment later.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps} is invalid: expected null or an integer >= 1")
        self.path = Path(dirpath) / LAST_CHECKPOINT
        self.every_n_train_steps = every_n_train_steps
        self._saved_at: int | None = None
        # False: save at epoch ends only (a multi-task run, whose mid-epoch position Lightning does not restore
        # exactly under manual optimization; it repeats the interrupted epoch instead).
        self.mid_epoch = True
        self._rng_to_restore: dict[str, Any] | None = None

    def save(self, trainer: L.Trainer) -> None:
        # Decided alike on every rank: saving is collective (a barrier) under DDP.
        if self._saved_at == trainer.global_step:
            return
        trainer.save_checkpoint(self.path)
        self._saved_at = trainer.global_step
        log.debug("resume checkpoint at step %d: %s", trainer.global_step, self.path)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, TracksPosition):
            loader.consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            loader.pass_done = loader.consumed >= trainer.num_training_batches
        n = self.every_n_train_steps
        at_epoch_end = trainer.fit_loop.epoch_loop._num_ready_batches_reached()
        if n and self.mid_epoch and trainer.global_step % n == 0 and not at_epoch_end:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # `configure_optimizers` reads `trainer.estimated_stepping_batches`, which makes Lightning build and start
        # iterating the training loader before it restores the checkpoint; it then never loads the loader's saved
        # position. Load it here and restart the iteration from it (private loop attributes: no public hook). The
        # RNG states go back first, so the restarted iteration draws what the uninterrupted run drew after saving.
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        fit_loop = trainer.fit_loop
        states = fit_loop._combined_loader_states_to_load
        if states and fit_loop._combined_loader is not None and fit_loop._data_fetcher is not None:
            fit_loop._combined_loader._load_state_dicts(states)
            fit_loop._combined_loader_states_to_load = []
            iter(fit_loop._data_fetcher)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training and self.mid_epoch:
            self.save(trainer)
            log.warning("SIGTERM: saved %s at step %d; resume with resume=true", self.path, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict["rng"]


def resume_path(value: Any, last: Path) -> Path | None:
    """The checkpoint the `resume` option asks for: None (start fresh), `last` when it exists, or a given file."""
    if value is False or value is None:
        return None
    if value is True:
        if last.is_file():
            return check_resumable(last)
        log.info("resume=true: no %s yet, starting fresh", last)
        return None
    if isinstance(value, str) and Path(value).expanduser().is_file():
        return check_resumable(Path(value).expanduser())
    raise ConfigError(
        f"resume={value!r} is invalid: expected true (resume from {last} when it exists), false, "
        "or the path of an existing checkpoint file"
    )


def check_resumable(checkpoint: Path) -> Path:
    """`checkpoint`, refused with what to do instead when the file is truncated or damaged.

    Lightning would load it only inside `trainer.fit`, after the data and model are set up, and fail there with a
    traceback; `lora_vision.models.weights_file_damage` tells before.
    """
    damage = weights_file_damage(checkpoint)
    if damage is None:
        log.info("resuming from %s", checkpoint)
        return checkpoint
    others = sorted(p.name for p in checkpoint.parent.glob("*.ckpt") if p != checkpoint)
    found = f" ({checkpoint.parent} also holds {', '.join(others)})" if others else ""
    raise ConfigError(
        f"cannot resume from {checkpoint}: the checkpoint is truncated or damaged ({damage}); start fresh with "
        "resume=false (the earlier attempt is kept in previous-<n>/), or resume from another checkpoint with "
        f"resume=PATH{found}"
    )


def keep_interrupted_metrics(loggers: list[Any]) -> None:
    """Move each CSV logger's `metrics.csv` aside (`metrics.interrupted-<n>.csv`) before a resumed run logs.

    Lightning's CSVLogger deletes an existing `metrics.csv` at its first write, which would lose the interrupted
    attempt's history; the resumed attempt's file starts at the checkpoint's step.
    """
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        metrics = Path(logger.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if metrics.is_file():
            attempt = len(list(metrics.parent.glob("metrics.interrupted-*.csv"))) + 1
            metrics.rename(metrics.with_name(f"metrics.interrupted-{attempt}.csv"))


def best_checkpoint_on_disk(callback: ModelCheckpoint) -> Path | None:
    """The best checkpoint `callback` kept, found on disk: its recorded best file when that exists, else the best
    of the files it saved, by the score each file recorded when it was saved (ties: the earlier epoch).

    A `last.ckpt` written by earlier releases before its epoch's best was saved names a best file that was deleted
    since; a resume or rerun from it must still test the best weights, not fail on the missing file. A candidate
    is mapped lazily and read as tensors only (`weights_only`), so no code in it runs.
    """
    recorded = Path(callback.best_model_path) if callback.best_model_path else None
    if recorded is not None and recorded.is_file():
        return recorded
    if callback.dirpath is None:
        return None
    scored = []
    for candidate in Path(callback.dirpath).glob(f"*{callback.FILE_EXTENSION}"):
        if candidate.name == LAST_CHECKPOINT:
            continue
        saved = torch.load(candidate, map_location="cpu", weights_only=True, mmap=True)
        score = saved.get("callbacks", {}).get(callback.state_key, {}).get("current_score")
        if score is not None and torch.isfinite(score):
            sign = 1.0 if callback.mode == "max" else -1.0
            scored.append((-sign * float(score), saved.get("epoch", 0), candidate))
    if not scored:
        return None
    best = min(scored)[2]
    log.info("best checkpoint %s found on disk (the resumed state named %s)", best, recorded)
    callback.best_model_path = str(best)
    return best


def resume_callback(callbacks: list[Any]) -> ResumeCheckpoint | None:
    return next((c for c in callbacks if isinstance(c, ResumeCheckpoint)), None)


def requested_checkpoint(cfg: DictConfig, callbacks: list[Any]) -> Path | None:
    """The checkpoint to resume from for this run, per `cfg.resume` (see conf/train.yaml)."""
    value = cfg.get("resume", False)
    callback = resume_callback(callbacks)
    if callback is None:
        if value is True:
            raise ConfigError("resume=true needs the callbacks.resume_checkpoint callback, which writes last.ckpt")
        last = Path(cfg.paths.output_dir) / "checkpoints" / LAST_CHECKPOINT
    else:
        last = callback.path
    return resume_path(value, last)


def resume_point(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> Path | None:
    """`requested_checkpoint`; when resuming, the interrupted attempt's metrics file is kept (rank zero)."""
    resume_from = requested_checkpoint(cfg, callbacks)
    if resume_from is not None and rank_zero_only.rank == 0:
        keep_interrupted_metrics(loggers)
    return resume_from
