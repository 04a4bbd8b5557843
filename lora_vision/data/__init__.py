"""Data layer: LightningDataModules whose transforms follow the backbone's timm data config.

Every datamodule takes the common keyword options of :class:`ImageDataModule` (``data_config``,
``batch_size``, ``num_workers``, ``pin_memory``, ``persistent_workers``, ``seed``, ``val_fraction``,
``train_augment``, ``train_subset``, ``resize_on_device``) and knows ``num_classes`` / ``class_names`` right
after construction. With ``resize_on_device`` its batches need ``batch_transform`` on the device (Lightning
calls it; manual loops must too).
"""

from lora_vision.data.archive import extract_archive
from lora_vision.data.base import ImageDataModule
from lora_vision.data.batched import BatchTransform
from lora_vision.data.cifar import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModule,
)
from lora_vision.data.errors import DataOptionError, DatasetFormatError, DatasetNotFoundError
from lora_vision.data.image_folder import FolderDataModule, ImageFolderDataModule
from lora_vision.data.image_list import ImageList, read_image_list
from lora_vision.data.imagenet import ImageNetSubsetDataModule
from lora_vision.data.imagenet_subsets import (
    IMAGENET100,
    IMAGENETTE,
    IMAGEWOOF,
    PRESETS,
    imagenet_class_name,
    imagenet_index,
    imagenet_wnids,
)
from lora_vision.data.synthetic import SyntheticDataModule, SyntheticImageDataset
from lora_vision.data.transforms import DEFAULT_DATA_CONFIG, build_transform
from lora_vision.data.vtab1k import VTab1kDataModule
from lora_vision.data.vtab1k_tasks import TASK_NAMES as VTAB1K_TASK_NAMES
from lora_vision.data.vtab1k_tasks import TASKS as VTAB1K_TASKS

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DEFAULT_DATA_CONFIG",
    "IMAGENET100",
    "IMAGENETTE",
    "IMAGEWOOF",
    "PRESETS",
    "VTAB1K_TASKS",
    "VTAB1K_TASK_NAMES",
    "BatchTransform",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "DataOptionError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FolderDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageList",
    "ImageNetSubsetDataModule",
    "SyntheticDataModule",
    "SyntheticImageDataset",
    "VTab1kDataModule",
    "build_transform",
    "extract_archive",
    "imagenet_class_name",
    "imagenet_index",
    "imagenet_wnids",
    "read_image_list",
]
