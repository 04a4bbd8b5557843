"""Datamodules over split-per-folder image datasets: the shared base and the generic one."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from lora_vision.data.base import ImageDataModule
from lora_vision.data.folder import FolderSource, list_classes, open_image_folder


class FolderDataModule(ImageDataModule):
    """Base of datamodules reading ``<root>/<split folder>/<class>/<image>``, or a tar of that layout.

    Options (besides those of :class:`ImageDataModule`):
        root: the directory holding the split folders; the default depends on the dataset. Relative
            paths are relative to the working directory.
        archive: optional tar (``.tar``, ``.tar.gz``, ...) of that layout, read instead of ``root``. It is
            extracted once (safe under concurrent runs, re-extracted when the archive changes) into
            ``cache_dir/<archive name>``; a single top-level folder inside the tar is stepped into.
        cache_dir: where archives are extracted; default ``<root>/extracted``.

    Subclasses set ``dataset_name`` (for messages), ``default_root`` and ``split_folders`` (split name ->
    folder name).
    """

    dataset_name: ClassVar[str]
    default_root: ClassVar[str]
    split_folders: ClassVar[Mapping[str, str]]

    def __init__(
        self,
        *,
        root: str | os.PathLike[str] | None = None,
        archive: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(self.default_root if root is None else root)
        self.source = FolderSource(
            self.root, archive, cache_dir, dataset_name=self.dataset_name, split_folders=self.split_folders
        )

    def prepare_data(self) -> None:
        """Extract the archive, if one is configured."""
        self.source.prepare()


class ImageFolderDataModule(FolderDataModule):
    """Images in ``<root>/train/<class>/<image>``, plus optional ``val/`` and ``test/`` folders alike.

    Labels are the sorted class-folder names of ``train/`` (torchvision ImageFolder order); ``val/`` and
    ``test/`` must have exactly the same class folders. With ``val_fraction > 0`` validation is carved from
    ``train/`` even if ``val/`` exists; with ``val_fraction=0`` it is ``val/``, else ``test/``. The test
    split is ``test/``, else ``val/``.

    Options: those of :class:`FolderDataModule` (``root`` defaults to ``data``) and :class:`ImageDataModule`.
    """

    dataset_name = "image folder dataset"
    default_root = "data"
    split_folders: ClassVar[Mapping[str, str]] = {"train": "train", "val": "val", "test": "test"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        # Read from train/ on first use, which extracts a configured archive first: the model head needs
        # the classes before setup() runs.
        if self._class_names is None:
            self._class_names = list_classes(self.source.split_dir("train", required=True))
        return self._class_names

    def _load_split(self, split: str, *, required: bool) -> Dataset | None:
        folder = self.source.split_dir(split, required=False)
        if folder is None and split == "test":
            folder = self.source.split_dir("val", required=False)
        if folder is None:
            if required:
                raise self.source.missing_split_error(split)
            return None
        return open_image_folder(folder, expected_classes=self.class_names)
