"""Extract a tar archive of a dataset exactly once, safely under concurrent callers.

Extraction goes into a temporary directory next to the target, which is renamed into place only when
complete, under an exclusive ``fcntl.flock`` on a lock file: a crashed run leaves no half-extracted tree,
and two runs (DDP ranks, parallel sweeps sharing a cache) never extract over each other. A marker file
inside the extracted tree records the archive's name, size and mtime, so a changed archive re-extracts.
"""

from __future__ import annotations

import fcntl
import json
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_vision.data.errors import DatasetFormatError, DatasetNotFoundError
from lora_vision.errors import one_line

MARKER_NAME = ".lora_vision_extracted.json"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# What reading a cut-short or corrupted archive raises: tarfile's own error, or the decompressor's (gzip's
# BadGzipFile and bz2's "Invalid data stream" are OSErrors, see `_archive_damaged`). Not tarfile.FilterError (an
# unsafe member, refused as it is).
ARCHIVE_READ_ERRORS = (tarfile.ReadError, EOFError, zlib.error, lzma.LZMAError, OSError)


def archive_stem(archive: str | os.PathLike[str]) -> str:
    """The archive's file name without its tar suffix: ``cifar10-jpeg.tar.gz`` -> ``cifar10-jpeg``."""
    name = Path(archive).name
    for suffix in TAR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _archive_damaged(err: BaseException) -> bool:
    """Whether `err`, one of ARCHIVE_READ_ERRORS, says that the archive is cut short or corrupt.

    The decompressors' OSErrors carry no errno; an error of the file system (a full disk while extracting, a
    permission) carries one, and is not the archive's fault.
    """
    return not isinstance(err, OSError) or err.errno is None


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Extract the tar ``archive`` into the directory ``dest`` unless an up-to-date copy is already there.

    Returns ``dest``. Raises :class:`DatasetNotFoundError` if the archive does not exist and
    :class:`DatasetFormatError` if it is not a tar file, is truncated or corrupt (nothing is left in ``dest``
    then), or if ``dest`` exists but was not made by this function (it is never overwritten then).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DatasetNotFoundError(
            f"archive {archive} does not exist (or is not a file); point data.archive at a tar of the dataset"
        )
    try:
        is_tar = tarfile.is_tarfile(archive)
    except ARCHIVE_READ_ERRORS as err:
        # A compressed tar cut short inside its first header fails here, where is_tarfile reads that header.
        if not _archive_damaged(err):
            raise
        is_tar = False
    if not is_tar:
        raise DatasetFormatError(
            f"{archive} is not a tar archive, or is truncated or corrupt; expected a whole tar file such as "
            f"{', '.join(TAR_SUFFIXES)}: copy it again if it is one"
        )
    stamp = _stamp(archive)
    # Lock-free fast path: a marker only ever exists inside a complete tree (it is written before the rename).
    if _read_marker(dest) == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dest.with_name(f"{dest.name}.lock")):
        if _read_marker(dest) == stamp:
            return dest
        if dest.exists() and _read_marker(dest) is None:
            raise DatasetFormatError(
                f"refusing to extract {archive} over {dest}: it exists but was not extracted by lora_vision; "
                "remove it or choose another cache_dir"
            )
        _remove_leftovers(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            _extract(archive, tmp)
            (tmp / MARKER_NAME).write_text(json.dumps(stamp))
            _swap_into_place(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _extract(archive: Path, tmp: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    except ARCHIVE_READ_ERRORS as err:
        if not _archive_damaged(err):
            raise
        raise DatasetFormatError(
            f"{archive} is truncated or corrupt: extracting it failed ({one_line(err)}); copy or download it again "
            "(its size should match the original's), then rerun"
        ) from None


def _stamp(archive: Path) -> dict[str, object]:
    stat = archive.stat()
    return {"archive": archive.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_marker(dest: Path) -> dict[str, object] | None:
    try:
        return json.loads((dest / MARKER_NAME).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    # Closing the file releases the lock, also when the process dies, so a crash cannot leave it held.
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _remove_leftovers(dest: Path) -> None:
    # Called under the lock: any temporary sibling belongs to a run that was killed mid-extraction.
    for leftover in dest.parent.glob(f".{dest.name}.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    # os.replace cannot overwrite a non-empty directory, so a stale copy is moved aside first and deleted
    # only after the new tree is in place.
    stale = None
    if dest.exists():
        stale = dest.with_name(f".{dest.name}.stale.tmp")
        dest.rename(stale)
    os.replace(tmp, dest)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
