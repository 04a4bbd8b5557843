"""Datamodule for an ImageNet-style folder (``train/<wnid>/``, ``val/<wnid>/``) restricted to a class list."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch.utils.data import Dataset

from lora_vision.data.folder import open_class_subset
from lora_vision.data.image_folder import FolderDataModule
from lora_vision.data.imagenet_subsets import (
    imagenet_class_name,
    imagenet_index,
    imagenet_wnids,
    resolve_classes,
)


class ImageNetSubsetDataModule(FolderDataModule):
    """A subset of ImageNet-1k classes read from ``<root>/train/<wnid>/`` and ``<root>/val/<wnid>/``.

    The ``val/`` folder (ImageNet's held-out set) is served as the test split; validation is carved from
    ``train/`` (``val_fraction``), or with ``val_fraction=0`` is the ``val/`` folder too. Folders of
    other wnids are ignored, so a full ImageNet tree works as well as an Imagenette/Imagewoof download.

    Options (besides ``root``, ``archive``, ``cache_dir`` of :class:`FolderDataModule`, where ``root``
    holds ``train/`` and ``val/`` and defaults to ``data/imagenet``, and those of :class:`ImageDataModule`):
        preset: ``imagenette``, ``imagewoof`` or ``imagenet100`` (the CMC ImageNet-100 class list).
        classes: an explicit wnid list instead of ``preset`` (exactly one of the two must be given).
        keep_imagenet_labels: if True, targets are the wnids' ImageNet-1k indices and ``num_classes`` is
            1000, so a pretrained 1k head is evaluated as-is (zero-shot baseline); ``imagenet_indices``
            then gives the columns of the subset's classes. If False, targets are 0..K-1 in class order.

    Attributes: ``wnids`` (the subset's wnids in class order), ``imagenet_indices`` (their 1k indices),
    ``class_names`` (short names for every output index; all 1000 with ``keep_imagenet_labels``).
    """

    dataset_name = "ImageNet subset"
    default_root = "data/imagenet"
    split_folders: ClassVar[Mapping[str, str]] = {"train": "train", "test": "val"}

    def __init__(
        self,
        *,
        preset: str | None = None,
        classes: Sequence[str] | None = None,
        keep_imagenet_labels: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.wnids: list[str] = list(resolve_classes(preset, classes))
        self.imagenet_indices: list[int] = [imagenet_index(wnid) for wnid in self.wnids]
        self.keep_imagenet_labels = keep_imagenet_labels

    @property
    def class_names(self) -> list[str]:
        wnids = imagenet_wnids() if self.keep_imagenet_labels else self.wnids
        return [imagenet_class_name(wnid) for wnid in wnids]

    def _load_split(self, split: str, *, required: bool) -> Dataset | None:
        if split == "val":
            return None
        labels = self.imagenet_indices if self.keep_imagenet_labels else range(len(self.wnids))
        class_to_idx = dict(zip(self.wnids, labels, strict=True))
        return open_class_subset(self.source.split_dir(split, required=True), class_to_idx)
