"""Checks of the machine a run needs, made before any work, so a full disk or a read-only directory fails
with the path and the reason instead of a traceback from deep inside a logger or checkpoint writer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lora_vision.config_checks import ConfigError


class OutputDirError(ConfigError):
    """The run directory cannot be created or written; the message names the path, the reason and the keys."""


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` if needed and prove it writable by writing, syncing and removing a small file.

    A real write (not `os.access`) is what catches a full disk, a read-only mount or a quota, and it is what
    root's permission checks cannot fake. Returns the directory.
    """
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                # More than a block, so a file system with no free blocks refuses it on write or fsync.
                handle.write(b"\0" * 8192)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            Path(probe).unlink(missing_ok=True)
    except OSError as err:
        raise OutputDirError(
            f"paths.output_dir={str(directory)!r} is not writable ({err.strerror or err}); the run writes its "
            "checkpoints, logs and results.json there. Free space or fix its permissions, or choose another "
            "directory with hydra.run.dir=... (hydra.sweep.dir=... for a multirun) or paths.log_dir=..."
        ) from err
    return directory
