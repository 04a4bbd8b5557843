"""Run records: what a run was, what it cost and what it scored, written atomically as `results.json`."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import lightning
import timm
import torch

from lora_vision.errors import OutputWriteError

RESULTS_FILE = "results.json"
# Written by the Optuna sweeper into its sweep directory (the best trial of a search, or a two-objective search's
# Pareto front), read by the sweep report.
BEST_FILE = "optimization_results.yaml"
PARETO_FILE = "pareto_front.yaml"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _umask() -> int:
    # The only way to read the umask is to set it; done once, at import, before any worker threads exist.
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What `open()` would give a new file; mkstemp's temporary files are owner-only (0600), and renaming keeps that.
NEW_FILE_MODE = 0o666 & ~_umask()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` so readers (sweep collectors, reports, a resumed run) never see a half-written file.

    The data goes to a temporary file in the same directory, is flushed to disk, then renamed over `path`
    (`os.replace` is atomic on POSIX and Windows when source and target share a filesystem).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        # The message adds which file and that the
        # previous one survived, which a bare "No space left on device" from a temporary file does not say.
        raise OutputWriteError(
            err.errno, f"cannot write {path} ({err.strerror or err}); any previous version of it is unchanged"
        ) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON, written atomically; NaN/inf are refused (JSON has none)."""
    return write_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def versions() -> dict[str, str | None]:
    """Versions of the software that decides a run's numbers."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "lora_vision": _package_version("lora_vision"),
    }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state() -> dict[str, Any]:
    """The project's git commit (None outside a git checkout or before the first commit) and whether the
    working tree had uncommitted changes (None when unknown)."""
    commit = _git("rev-parse", "--verify", "HEAD")
    status = _git("status", "--porcelain") if commit else None
    return {"git_commit": commit or None, "git_dirty": None if status is None else bool(status)}


def finite_or_none(value: Any) -> float | None:
    """A metric as a plain float, or None when it is missing or not finite (JSON has no NaN)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
