"""Silence the lines libraries print on every run that tell a lora_vision user nothing they can act on.

Each is matched at its source, by logger name or warning module, and by the start of its text, so that every other
line of the same library (Lightning's device line, checkpoint paths, a warning about the run itself) still shows.
"""

from __future__ import annotations

import logging
import re
import warnings

# Logger -> starts of the log lines it prints that are noise here.
NOISE_LOG_LINES: dict[str, tuple[str, ...]] = {
    # Lightning's `rank_zero_info` logs through this logger (lightning_utilities' rank_zero module points at it).
    "lightning.pytorch.utilities.rank_zero": (
        # Advertisements for Lightning's cloud services (litlogger, litmodels).
        "💡 Tip:",
        # The trainer configs target CPUs and CUDA GPUs only; the GPU line beside it stays.
        "TPU available:",
        # Printed before the learning-rate schedule (lora_vision.module) asks for the number of steps.
        "Loading `train_dataloader` to estimate number of stepping batches.",
    ),
    # Once per checkpoint saved: Lightning's default for a save option lora_vision does not use.
    "lightning.pytorch.trainer.connectors.checkpoint_connector": ("`weights_only` was not set, defaulting to",),
}

# (text at the start of the message, category, module that warns) of the warnings that are noise here.
NOISE_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # On any machine with SLURM installed, for a run not started with srun, which is how a single-device run or a
    # sweep (hydra/launcher=slurm submits its own jobs) is meant to be started.
    (
        "The `srun` command is available on your system but is not used",
        UserWarning,
        "lightning.fabric.plugins.environments.slurm",
    ),
    # Lightning's own use of a torch API that torch deprecated; nothing in the run can change it.
    (
        "`isinstance(treespec, LeafSpec)` is deprecated",
        FutureWarning,
        "lightning.pytorch.utilities._pytree",
    ),
)


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_third_party() -> None:
    """Drop NOISE_LOG_LINES and NOISE_WARNINGS from here on; calling it again adds nothing."""
    for name, starts in NOISE_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropLines) for existing in logger.filters):
            logger.addFilter(_DropLines(starts))
    for text, category, module in NOISE_WARNINGS:
        # filterwarnings takes regular expressions, and puts an identical filter only once at the front.
        warnings.filterwarnings("ignore", message=re.escape(text), category=category, module=re.escape(module) + "$")
