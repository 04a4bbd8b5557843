"""Locate split-per-folder image datasets (a directory or an extracted tar) and open them as ImageFolders."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from lora_vision.data.archive import archive_stem, extract_archive
from lora_vision.data.errors import DatasetFormatError, DatasetNotFoundError
from lora_vision.data.images import load_rgb


class FolderSource:
    """Where a dataset laid out as ``<dir>/<split folder>/<class>/<image>`` lives.

    Options:
        root: the directory holding the split folders, unless ``archive`` is given.
        archive: optional tar (``.tar``, ``.tar.gz``, ...) of that layout; it is extracted once into
            ``cache_dir/<archive name without suffix>``. If the archive wraps everything in one top-level
            folder (as fast.ai's ``imagewoof2-160.tgz`` does), that folder is used.
        cache_dir: where archives are extracted; defaults to ``<root>/extracted``.
        dataset_name: used in error messages.
        split_folders: split name (``train``, ``val``, ``test``) -> folder name, e.g. ImageNet's test split
            is its ``val`` folder.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        archive: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        dataset_name: str,
        split_folders: Mapping[str, str],
    ) -> None:
        self.root = Path(root)
        self.archive = None if archive is None else Path(archive)
        self.cache_dir = self.root / "extracted" if cache_dir is None else Path(cache_dir)
        self.dataset_name = dataset_name
        self.split_folders = dict(split_folders)
        self._base: Path | None = None

    def has_split_folders(self) -> bool:
        """True when an archive is configured or ``root`` already holds at least one split folder."""
        return self.archive is not None or any((self.root / f).is_dir() for f in self.split_folders.values())

    def prepare(self) -> Path:
        """Extract the archive if needed (idempotent, concurrency-safe); return the dir holding the splits."""
        if self._base is None:
            if self.archive is None:
                self._base = self.root
            else:
                extracted = extract_archive(self.archive, self.cache_dir / archive_stem(self.archive))
                self._base = self._unwrap_single_folder(extracted)
        return self._base

    def split_dir(self, split: str, *, required: bool) -> Path | None:
        """The folder of ``split``; None if it is absent and not ``required``, else DatasetNotFoundError."""
        path = self.prepare() / self.split_folders[split]
        if path.is_dir():
            return path
        if required:
            raise self.missing_split_error(split)
        return None

    def missing_split_error(self, split: str) -> DatasetNotFoundError:
        """The error for an absent ``split`` folder, naming the path and the options to change."""
        path = self.prepare() / self.split_folders[split]
        layout = "{" + ",".join(self.split_folders.values()) + "}/<class>/<image>"
        source = f"extracted from {self.archive}" if self.archive is not None else "under root"
        return DatasetNotFoundError(
            f"{self.dataset_name}: {split} split folder {path} not found ({source}); expected the layout "
            f"<dir>/{layout}. Point the datamodule option `root` at that <dir> (Hydra: data.root=...) or "
            "`archive` at a tar of it (data.archive=...)."
        )

    def _unwrap_single_folder(self, extracted: Path) -> Path:
        if any((extracted / f).is_dir() for f in self.split_folders.values()):
            return extracted
        children = [p for p in extracted.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return children[0] if len(children) == 1 else extracted


def list_classes(split_dir: Path) -> list[str]:
    """Class folder names of ``split_dir`` in ImageFolder's (sorted) label order."""
    try:
        return find_classes(split_dir)[0]
    except FileNotFoundError as exc:
        raise DatasetFormatError(f"{split_dir} holds no class folders; expected {split_dir}/<class>/<image>") from exc


def open_image_folder(split_dir: Path, expected_classes: Sequence[str] | None = None) -> ImageFolder:
    """An untransformed ImageFolder over all class folders of ``split_dir``; unreadable images raise BadImageError.

    With ``expected_classes``, the class folders must be exactly these, in this (label) order; this keeps
    labels consistent across splits and with a dataset's standard label order.
    """
    if expected_classes is not None:
        found = list_classes(split_dir)
        if found != list(expected_classes):
            raise DatasetFormatError(
                f"{split_dir} has class folders {found}; expected exactly {list(expected_classes)} "
                "(sorted folder names must give the label order)"
            )
    return _scan(lambda: ImageFolder(split_dir, loader=load_rgb), split_dir)


def open_class_subset(split_dir: Path, class_to_idx: Mapping[str, int]) -> ImageFolder:
    """An untransformed ImageFolder over only the class folders in ``class_to_idx``, labelled by it."""
    missing = [name for name in class_to_idx if not (split_dir / name).is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} class folder(s) missing under {split_dir}: "
            + ", ".join(str(split_dir / name) for name in missing)
        )
    return _scan(lambda: _ClassSubsetImageFolder(split_dir, class_to_idx), split_dir)


class _ClassSubsetImageFolder(ImageFolder):
    """ImageFolder whose classes and labels come from a given mapping instead of every sub-folder."""

    def __init__(self, root: Path, class_to_idx: Mapping[str, int]) -> None:
        self._given_class_to_idx = dict(class_to_idx)
        super().__init__(root, loader=load_rgb)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        return list(self._given_class_to_idx), dict(self._given_class_to_idx)


def _scan(make: Callable[[], ImageFolder], split_dir: Path) -> ImageFolder:
    # torchvision's message names the empty classes and valid extensions, but not the folder.
    try:
        return make()
    except FileNotFoundError as exc:
        raise DatasetFormatError(f"{split_dir}: {exc}") from exc
