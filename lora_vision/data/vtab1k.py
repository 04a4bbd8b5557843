"""VTAB-1k: one of its 19 tasks from the released layout, with the protocol's fixed splits."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from lora_vision.data.errors import DataOptionError, DatasetNotFoundError
from lora_vision.data.image_folder import FolderDataModule
from lora_vision.data.image_list import ImageList, read_image_list
from lora_vision.data.vtab1k_tasks import TASK_NAMES, vtab1k_task

LIST_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
# The list file each split reads, by protocol (Zhai et al. 2019, arXiv:1910.04867, section 4): hyperparameters are
# chosen training on the 800 images and validating on the 200, then the final model trains on all 1,000 and is
# scored once on the test set.
PROTOCOLS: dict[str, dict[str, str]] = {
    # val200 is part of the training images here: it shows how well they are fitted, nothing more.
    "final": {"train": "train800val200.txt", "val": "val200.txt", "test": "test.txt"},
    # test.txt is never read: the test split is val200 as well.
    "tune": {"train": "train800.txt", "val": "val200.txt", "test": "val200.txt"},
}
# timm's crop modes of the evaluation transform.
CROP_MODES = ("squash", "center", "border")
LAYOUT = f"<dir>/<task>/ holding images/ and the list files {', '.join(LIST_FILES)}"


class VTab1kDataModule(FolderDataModule):
    """One VTAB-1k task read from ``<root>/<task>/``: its list files and the images they name.

    The layout is the one NOAH's preparation script writes (github.com/ZhangYuanhan-AI/NOAH,
    data/vtab-source/get_vtab1k.py) and the prepared copies the PEFT papers share: per task ``train800.txt``,
    ``val200.txt``, ``train800val200.txt`` and ``test.txt``, each line an image path relative to the task folder
    and an integer label. Labels are the class indices (the lists name no classes), so ``class_names`` are
    ``"0"``, ``"1"``, ...; ``num_classes`` comes from the task table without reading any file.

    Options (besides ``root``, ``archive``, ``cache_dir`` of :class:`FolderDataModule`, where ``root`` holds the
    task folders and defaults to ``data/vtab-1k``, and those of :class:`ImageDataModule`):
        task: the task's folder name (``lora_vision.data.vtab1k_tasks.TASK_NAMES``).
        protocol: ``final`` trains on train800val200 and tests on test; ``tune`` trains on train800, validates on
            val200 and tests on val200 too, so that choosing hyperparameters never reads the test set.
        crop_mode: how evaluation (and unaugmented training) images reach the input size: ``squash`` resizes
            the whole image to a square, as the VTAB-1k code of NOAH and its successors does; ``center`` and
            ``border`` are timm's aspect-preserving modes.

    The splits are fixed, so ``val_fraction`` must be 0 (its default here); ``train_augment`` defaults to off,
    as in the protocol.
    """

    dataset_name = "VTAB-1k"
    default_root = "data/vtab-1k"
    # The task folders stand where other datasets have split folders: an archive that wraps them in one folder
    # (vtab-1k/) is stepped into.
    split_folders: ClassVar[Mapping[str, str]] = {name: name for name in TASK_NAMES}

    def __init__(
        self, *, task: str = "cifar", protocol: str = "final", crop_mode: str = "squash", **kwargs: Any
    ) -> None:
        kwargs.setdefault("val_fraction", 0.0)
        kwargs.setdefault("train_augment", False)
        super().__init__(**kwargs)
        if self.val_fraction != 0:
            raise DataOptionError(
                f"val_fraction={self.val_fraction} is invalid for VTAB-1k: its validation split is the fixed "
                "val200.txt; set val_fraction=0 (Hydra: data.val_fraction=0) and choose the splits with protocol"
            )
        self.task = vtab1k_task(task)
        if protocol not in PROTOCOLS:
            raise DataOptionError(
                f"protocol={protocol!r} is invalid: expected one of {', '.join(PROTOCOLS)} (Hydra: data.protocol=...)"
            )
        if crop_mode not in CROP_MODES:
            raise DataOptionError(
                f"crop_mode={crop_mode!r} is invalid: expected one of {', '.join(CROP_MODES)} "
                "(Hydra: data.crop_mode=...)"
            )
        self.protocol = protocol
        self.crop_mode = crop_mode

    @property
    def class_names(self) -> list[str]:
        return [str(label) for label in range(self.task.num_classes)]

    @property
    def resolved_data_config(self) -> dict[str, Any]:
        return {**super().resolved_data_config, "crop_mode": self.crop_mode}

    def task_dir(self) -> Path:
        """The task's folder (extracting a configured archive first); DatasetNotFoundError naming it if absent."""
        base = self.source.prepare()
        path = base / self.task.name
        if not path.is_dir():
            found = sum((base / name).is_dir() for name in TASK_NAMES)
            source = f"extracted from {self.source.archive}" if self.source.archive is not None else "under root"
            raise DatasetNotFoundError(
                f"VTAB-1k task folder {path} not found ({source}; {found} of the 19 task folders are there). "
                f"Expected one folder per task, {LAYOUT}. Point the datamodule option `root` at <dir> (Hydra: "
                "data.root=...) or `archive` at a tar of it (data.archive=...)."
            )
        return path

    def list_file(self, split: str) -> Path:
        """The list file of ``split`` ('train', 'val' or 'test') under the protocol; DatasetNotFoundError if absent."""
        path = self.task_dir() / PROTOCOLS[self.protocol][split]
        if not path.is_file():
            raise DatasetNotFoundError(
                f"VTAB-1k list file {path} not found (task {self.task.name}, protocol {self.protocol}); expected "
                f"{LAYOUT}"
            )
        return path

    def prepare_data(self) -> None:
        """Extract the archive, if one is configured, and check every list the protocol reads, the test one too.

        Lightning calls this before training, so a missing or malformed test list fails then, not after training.
        """
        super().prepare_data()
        for split in ("train", "val", "test"):
            read_image_list(self.list_file(split), self.num_classes)

    def _load_split(self, split: str, *, required: bool) -> Dataset | None:
        return ImageList(self.list_file(split), self.class_names)
