"""CIFAR-10 / CIFAR-100 datamodules: torchvision's datasets, or an ImageFolder tree / tar of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.error import URLError

from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

from lora_vision.data.errors import DatasetNotFoundError
from lora_vision.data.folder import open_image_folder
from lora_vision.data.image_folder import FolderDataModule

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# The fine labels of CIFAR-100 in label order (alphabetical, as in the dataset's ``meta`` file).
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray",
    "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip


class CIFARDataModule(FolderDataModule):
    """Base of the CIFAR-10/100 datamodules. CIFAR from one of three sources, tried in this order:

    1. ``archive``: a tar (``.tar``, ``.tar.gz``) of an ImageFolder tree ``train/<class>/``,
       ``test/<class>/``, extracted once into ``cache_dir`` (default ``<root>/extracted``);
    2. ``root`` holding such a tree (``<root>/train/<class>/...``, ``<root>/test/<class>/...``);
    3. torchvision's dataset files under ``root``, downloaded there by ``prepare_data()`` if ``download``.

    Folder class names must equal the standard CIFAR class names, so folder labels are the standard labels.

    Options (besides ``root``, ``archive``, ``cache_dir`` of :class:`FolderDataModule` and those of
    :class:`ImageDataModule`):
        download: let ``prepare_data()`` download torchvision's files when no folder tree is found.

    ``root`` defaults to ``data/cifar10`` or ``data/cifar100``.

    There is no separate validation set: it is carved from training (``val_fraction``), or with
    ``val_fraction=0`` the test split is used for validation.

    Every image is 32x32 (``source_size``), so ``resize_on_device`` is available: the Hydra configs
    (``conf/data/common/cifar.yaml``) turn it on, because upscaling 32 px images to 224 px one by one in PIL
    is the slowest part of the input pipeline. The Python default stays off, so loaders used without a
    Trainer yield model-ready tensors unless asked otherwise.
    """

    split_folders: ClassVar[Mapping[str, str]] = {"train": "train", "test": "test"}
    source_size: ClassVar[tuple[int, int]] = (32, 32)
    torchvision_dataset: ClassVar[type[CIFAR10]]
    classes: ClassVar[tuple[str, ...]]

    def __init__(self, *, download: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.download = download

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def prepare_data(self) -> None:
        if self.source.has_split_folders():
            self.source.prepare()
        else:
            self._torchvision_split(train=True, download=self.download)

    def _load_split(self, split: str, *, required: bool) -> Dataset | None:
        if split == "val":
            return None
        if self.source.has_split_folders():
            return open_image_folder(self.source.split_dir(split, required=True), expected_classes=self.classes)
        return self._torchvision_split(train=split == "train", download=False)

    def _torchvision_split(self, *, train: bool, download: bool) -> Dataset:
        try:
            return self.torchvision_dataset(str(self.root), train=train, download=download)
        except (URLError, RuntimeError, OSError) as exc:
            action = "could not be downloaded" if download else "was not found (download is off)"
            raise DatasetNotFoundError(
                f"{self.dataset_name} {action}: expected an ImageFolder tree "
                f"{self.root}/{{train,test}}/<class>/ or torchvision's files under {self.root}. Set the "
                "datamodule option `root` to a directory holding either (Hydra: data.root=...), `archive` "
                "to a tar of the tree (data.archive=...), or `download=true` (data.download=true) on a "
                f"machine with internet access. Cause: {exc}"
            ) from exc


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 10 classes, 50000 train / 10000 test images of 32 px. Sources, options: CIFARDataModule."""

    dataset_name = "CIFAR-10"
    default_root = "data/cifar10"
    torchvision_dataset = CIFAR10
    classes = CIFAR10_CLASSES


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 100 classes, 50000 train / 10000 test images of 32 px. Sources, options: CIFARDataModule."""

    dataset_name = "CIFAR-100"
    default_root = "data/cifar100"
    torchvision_dataset = CIFAR100
    classes = CIFAR100_CLASSES
