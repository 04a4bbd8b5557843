"""What the same command run again in a run directory does: a finished run is reported (or tested again, on
request) and keeps its files, an unfinished one resumes, a different configuration is refused, and an earlier
attempt that a fresh start would overwrite is kept.

Every path from a user command keeps the run's `results.json`: a rerun of a finished sweep, a SLURM requeue after
the last epoch or a second `python -m lora_vision.train ... hydra.run.dir=D` must never turn a finished record into
a failed one.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_vision.config_checks import ConfigError
from lora_vision.results import RESULTS_FILE

log = logging.getLogger(__name__)

# Statuses of a run that ended by itself: training again would only repeat it.
FINISHED = ("completed", "pruned", "diverged")
RERUN_CHOICES = ("report", "test")
# What a fresh start (resume=false) would overwrite, set aside into previous-<n>/ first.
ATTEMPT_FILES = (RESULTS_FILE, "checkpoints", "adapter", "csv", "tensorboard", "eval", "analysis")


def previous_record(run_dir: Path) -> dict[str, Any] | None:
    """The run directory's `results.json`, or None when there is none.

    An unreadable one (a file written by hand, or by a tool that does not write atomically) is moved aside rather
    than overwritten, so nothing is lost: `results.unreadable-<n>.json`.
    """
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        kept = _numbered(run_dir, "results.unreadable-{}.json")
        path.rename(kept)
        log.warning("%s could not be read (%s); kept as %s", path, err, kept.name)
        return None
    return record if isinstance(record, dict) else None


def _numbered(run_dir: Path, pattern: str) -> Path:
    n = 1
    while (run_dir / pattern.format(n)).exists():
        n += 1
    return run_dir / pattern.format(n)


def check_same_run(previous: Mapping[str, Any], identity: Mapping[str, Any], run_dir: Path) -> None:
    """Refuse to continue or report a run directory that holds another configuration's run.

    `identity` holds the record fields that decide what is trained (model, method settings, data, seed, learning
    rate, batch size, epochs); a field the earlier record lacks (written by an earlier release) is not compared.
    """
    differ = [
        f"{key} {previous[key]!r} there, {value!r} now"
        for key, value in identity.items()
        if key in previous and previous[key] != value
    ]
    if differ:
        raise ConfigError(
            f"{run_dir} holds a run of another configuration ({'; '.join(differ)}): give this one its own "
            "hydra.run.dir, or start over there with resume=false (the earlier attempt is kept in previous-<n>/)"
        )


def finished(previous: Mapping[str, Any] | None) -> bool:
    return previous is not None and previous.get("status") in FINISHED


def describe_finished(record: Mapping[str, Any], run_dir: Path) -> str:
    outcome = ", ".join(
        f"{key} {record[key]:.4f}"
        for key in ("best_val_acc1", "test_acc1", "objective")
        if isinstance(record.get(key), int | float)
    )
    return (
        f"{run_dir} holds a finished run (status {record['status']}{', ' + outcome if outcome else ''}); its files "
        "are unchanged. rerun=test tests its selected checkpoint again; resume=false trains it again (the earlier "
        "attempt is kept in previous-<n>/)"
    )


def set_aside(run_dir: Path) -> Path | None:
    """Move an earlier attempt's record, checkpoints, adapter and logs into `previous-<n>/`; None if there were none."""
    present = [run_dir / name for name in ATTEMPT_FILES if (run_dir / name).exists()]
    if not present:
        return None
    target = _numbered(run_dir, "previous-{}")
    target.mkdir()
    for path in present:
        shutil.move(str(path), target / path.name)
    log.info("the earlier attempt in %s is kept in %s", run_dir, target)
    return target


def keep_record(run_dir: Path) -> Path:
    """Copy a finished run's `results.json` into `previous-<n>/` before it is tested again."""
    target = _numbered(run_dir, "previous-{}")
    target.mkdir()
    shutil.copy2(run_dir / RESULTS_FILE, target / RESULTS_FILE)
    return target / RESULTS_FILE


def check_rerun_choice(value: Any) -> None:
    if value not in RERUN_CHOICES:
        raise ConfigError(
            f"rerun={value!r} is invalid: give report (a finished run is reported and left as it is) or test "
            "(its selected checkpoint is tested again)"
        )
