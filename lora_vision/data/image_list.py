"""Datasets named by a list file: one ``<image path relative to the file's folder> <integer label>`` per line.

This is the format of the released VTAB-1k splits (``train800.txt``, ``test.txt``, ...). The list is checked as a
whole when it is read, so a malformed line or a missing image stops a run before training rather than in the
middle of it (or, for the test split, after it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from torchvision.datasets import DatasetFolder

from lora_vision.data.errors import DatasetFormatError, DatasetNotFoundError
from lora_vision.data.images import load_rgb

LINE_FORMAT = "'<image path relative to the list file's folder> <integer label>'"
# Missing images named in an error; a partly copied dataset misses thousands, and the first few say enough.
SHOWN_MISSING = 5


def read_image_list(list_file: Path, num_classes: int) -> list[tuple[str, int]]:
    """(image path, label) of every line of ``list_file``; blank lines are skipped.

    DatasetNotFoundError if the file or one of its images does not exist; DatasetFormatError, naming the file and
    line, for a line that is not a path and an integer label in ``[0, num_classes)``, or a file with no images.
    """
    if not list_file.is_file():
        raise DatasetNotFoundError(f"list file {list_file} not found")
    samples: list[tuple[str, int]] = []
    lines: list[int] = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        # Split at the last whitespace: the label is last, and an image path may itself hold spaces.
        parts = line.rsplit(maxsplit=1)
        try:
            label = int(parts[1]) if len(parts) == 2 else None
        except ValueError:
            label = None
        if label is None:
            raise DatasetFormatError(f"{list_file}, line {number}: expected {LINE_FORMAT}, got {line!r}")
        if not 0 <= label < num_classes:
            raise DatasetFormatError(
                f"{list_file}, line {number}: label {label} is outside 0..{num_classes - 1} ({num_classes} classes)"
            )
        samples.append((str(list_file.parent / parts[0]), label))
        lines.append(number)
    if not samples:
        raise DatasetFormatError(f"{list_file} lists no images; expected lines {LINE_FORMAT}")
    _check_images_exist(list_file, samples, lines)
    return samples


def _check_images_exist(list_file: Path, samples: list[tuple[str, int]], lines: list[int]) -> None:
    # One directory listing per folder instead of one stat per image: test lists hold up to tens of thousands of
    # images, and on a network file system a stat each would take minutes.
    present: dict[str, set[str]] = {}
    missing = []
    for (path, _), number in zip(samples, lines, strict=True):
        folder, name = os.path.split(path)
        if folder not in present:
            present[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if name not in present[folder]:
            missing.append(f"line {number}: {path}")
    if missing:
        shown = "; ".join(missing[:SHOWN_MISSING]) + ("; ..." if len(missing) > SHOWN_MISSING else "")
        raise DatasetNotFoundError(
            f"{list_file} names {len(missing)} image(s) that do not exist ({shown}); copy or extract the dataset "
            "completely, keeping the paths of the list files"
        )


class ImageList(DatasetFolder):
    """The untransformed images of a list file, labelled by it; unreadable images raise BadImageError.

    A DatasetFolder whose samples come from the list instead of a folder scan, so that what works on a folder's
    samples (dropping unreadable images with ``skip_bad_images``) works on it too.
    """

    def __init__(self, list_file: Path, class_names: Sequence[str]) -> None:
        self.list_file = Path(list_file)
        self._class_names = list(class_names)
        # The list file is the root: skip_bad_images counts unreadable images by root, and two lists of one
        # folder (train800.txt, val200.txt) hold different images.
        super().__init__(self.list_file, loader=load_rgb)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        return list(self._class_names), {name: index for index, name in enumerate(self._class_names)}

    def make_dataset(  # type: ignore[override]  # torchvision's is a staticmethod; this one reads the list
        self,
        directory: str | os.PathLike[str],
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        return read_image_list(self.list_file, len(class_to_idx))
