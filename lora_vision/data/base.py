"""The loader plumbing every datamodule shares: options, validation split, training subset, DataLoaders."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import DatasetFolder

from lora_vision.data.batched import BatchTransform
from lora_vision.data.errors import DataOptionError
from lora_vision.data.images import drop_unreadable
from lora_vision.data.resumable import ResumableDataLoader
from lora_vision.data.splits import TransformedSubset, balanced_subset, stratified_split
from lora_vision.data.transforms import (
    DEFAULT_DATA_CONFIG,
    AugmentConfig,
    build_transform,
    normalize_data_config,
)

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
# The most workers `num_workers="auto"` starts: more rarely help our datasets, and each holds its own memory.
MAX_AUTO_WORKERS = 8
# Seeds the test_subset draw: fixed, so runs with different seeds are scored on the same test images.
TEST_SUBSET_SEED = 0


class ImageDataModule(LightningDataModule, ABC):
    """Base class of the image-classification datamodules; all options are keyword-only.

    Options:
        data_config: the backbone's timm data config (``timm.data.resolve_model_data_config(model)``:
            ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``).
            Transforms follow it exactly, including an ``input_size`` the caller corrected (e.g. a ViT built
            with ``img_size=32``). It may also be assigned to the ``data_config`` attribute after
            construction; assigning discards datasets already set up, so the next ``setup()`` rebuilds them
            with the new transforms. None: timm's defaults (224 px, ImageNet mean/std, ``crop_pct=0.875``)
            or the datamodule's own default.
        batch_size: samples per batch, for every split.
        num_workers: DataLoader worker processes (0 loads in the main process), or ``"auto"``: one per CPU
            core this process may use, less one for the main process, at most 8 (``MAX_AUTO_WORKERS``).
            The resolved count is the ``num_workers`` attribute.
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies); ignored without CUDA.
        persistent_workers: keep workers alive between epochs; only used when ``num_workers > 0``.
        seed: seeds the validation split, the training subset and the shuffling order (each DataLoader
            gets its own seeded generator, which also seeds its workers). With ``num_workers=0``, random
            augmentation draws from the global RNG: seed it with ``lightning.seed_everything``.
        val_fraction: fraction of each training class held out (seeded, stratified) as the validation
            split, in [0, 1). 0 means no split: validation uses the dataset's own validation folder if it
            has one, else the test split (then validation and test scores are the same data).
        train_augment: True for timm's default training augmentation, False to train on the evaluation
            transform, or a mapping of ``timm.data.create_transform`` options (``auto_augment``,
            ``re_prob``, ``hflip``, ``scale``, ...).
        train_subset: if set, train on a seeded, class-balanced subset of this many images, taken after
            the validation split (so the validation set is the same for every subset size).
        test_subset: if set, test on a class-balanced subset of this many test images, drawn with a fixed
            seed (``TEST_SUBSET_SEED``, not ``seed``), so every run of a study, whatever its seed, is scored
            on the same images.
        resize_on_device: batch the resize and normalization (for datamodules whose images all have one
            size, ``source_size``: the CIFAR ones). Each worker then only augments at the source size (timm's
            training pipeline with its random-resized crop output at the source size) and yields uint8
            tensors, 1/196 of the bytes of float 224 px ones; ``batch_transform`` resizes whole batches to the
            input size and normalizes them, on the device after the transfer. Lightning runs it through the
            ``on_after_batch_transfer`` hook; loops without a Trainer must call ``batch_transform`` on each
            batch they moved to the device. ValueError if the datamodule has no fixed ``source_size`` or
            the data config asks for a resize tensors cannot mirror; every image of another size fails
            with a ValueError when loaded. See ``lora_vision.data.batched`` for the agreement with PIL.
        skip_bad_images: False: an image file that cannot be decoded (empty, truncated, not an image) fails
            with :class:`~lora_vision.data.images.BadImageError` naming it when it is loaded. True: every
            image file is decoded once when its split is set up (about 0.4 ms per 160 px JPEG), unreadable
            ones are left out, and their number is the ``skipped_images`` attribute (None when False).

    ``num_classes`` and ``class_names`` are available right after construction (the model head is built
    from them). ``dataset(split)`` gives the transformed dataset of a split. The predict loader serves the
    test split. Subclasses implement ``class_names`` and ``_load_split``, and set ``source_size`` when all
    their images have one size.
    """

    # (height, width) of every image of the dataset, None where sizes vary; resize_on_device needs one.
    source_size: ClassVar[tuple[int, int] | None] = None

    def __init__(
        self,
        *,
        data_config: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        num_workers: int | str = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        val_fraction: float = 0.1,
        train_augment: AugmentConfig = True,
        train_subset: int | None = None,
        test_subset: int | None = None,
        resize_on_device: bool = False,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, minimum=1)
        check_int("seed", seed, minimum=0)
        for name, size in (("train_subset", train_subset), ("test_subset", test_subset)):
            if size is not None:
                check_int(name, size, minimum=1)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 <= val_fraction < 1:
            raise DataOptionError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        if not isinstance(train_augment, bool | Mapping):
            raise DataOptionError(
                f"train_augment must be a bool or a mapping of timm transform options, got {train_augment!r}"
            )
        if not isinstance(resize_on_device, bool):
            raise DataOptionError(f"resize_on_device must be true or false, got {resize_on_device!r}")
        if not isinstance(skip_bad_images, bool):
            raise DataOptionError(f"skip_bad_images must be true or false, got {skip_bad_images!r}")
        if resize_on_device and self.source_size is None:
            raise DataOptionError(
                f"resize_on_device=true needs images of one fixed size (the CIFAR datamodules: 32x32), but "
                f"{type(self).__name__} has none; set resize_on_device=false (Hydra: data.resize_on_device=false)"
            )
        self.batch_size = batch_size
        self.num_workers = resolve_num_workers(num_workers)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.val_fraction = float(val_fraction)
        self.train_augment = train_augment
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.resize_on_device = resize_on_device
        self.skip_bad_images = skip_bad_images
        # image folder -> unreadable images left out; keyed by folder, so a folder serving two splits (val/ as
        # validation and test) or loaded again after a data_config change is counted once.
        self._skipped: dict[str, int] = {}
        self._raw: dict[str, Dataset | None] = {}
        self._splits: dict[str, TransformedSubset] = {}
        self._batch_steps: dict[bool, BatchTransform] = {}
        self.data_config = data_config

    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """Human-readable name of every label index; ``len(class_names) == num_classes``."""

    @property
    def num_classes(self) -> int:
        """Number of outputs the classification head needs."""
        return len(self.class_names)

    @property
    def skipped_images(self) -> int | None:
        """Unreadable images left out of the splits set up so far; None when ``skip_bad_images`` is off."""
        return sum(self._skipped.values()) if self.skip_bad_images else None

    @property
    def data_config(self) -> dict[str, Any] | None:
        """The timm data config the transforms follow (None: ``default_data_config()``)."""
        return self._data_config

    @data_config.setter
    def data_config(self, value: Mapping[str, Any] | None) -> None:
        self._data_config = None if value is None else normalize_data_config(value)
        self._raw.clear()
        self._splits.clear()
        self._batch_steps.clear()
        if self.resize_on_device:
            # Built now, so a data config the batch step cannot mirror fails here rather than at the first batch.
            for training in (False, True):
                self._batch_steps[training] = BatchTransform(
                    self.resolved_data_config, self.source_size, is_training=training, augment=self.train_augment
                )

    def default_data_config(self) -> dict[str, Any]:
        """The data config used while ``data_config`` is None."""
        return dict(DEFAULT_DATA_CONFIG)

    @property
    def resolved_data_config(self) -> dict[str, Any]:
        """``data_config`` with unspecified keys filled from ``default_data_config()``."""
        return {**self.default_data_config(), **(self._data_config or {})}

    @abstractmethod
    def _load_split(self, split: str, *, required: bool) -> Dataset | None:
        """The untransformed dataset of ``split`` ('train', 'val' or 'test').

        If the dataset has no such split: None, or DatasetNotFoundError naming where it was expected when
        ``required``. Items are (PIL image or tensor, int label); the dataset has a ``targets`` label list.
        """

    def build_transform(self, *, is_training: bool) -> Callable[[Any], Any] | None:
        """The transform applied to each item of the training (``is_training``) or evaluation splits."""
        return build_transform(
            self.resolved_data_config,
            is_training=is_training,
            augment=self.train_augment,
            source_size=self.source_size if self.resize_on_device else None,
        )

    def batch_transform(self, images: torch.Tensor, *, training: bool = False) -> torch.Tensor:
        """What a batch of images from this datamodule's loaders needs before the model, on its device.

        With ``resize_on_device``: the batched resize and normalization of a training (``training``) or
        evaluation batch; otherwise the images unchanged.
        """
        return self._batch_steps[training](images) if self.resize_on_device else images

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.resize_on_device:
            return batch
        images, targets = batch
        return self.batch_transform(images, training=self.trainer is not None and self.trainer.training), targets

    def setup(self, stage: str | None = None) -> None:
        """Build the splits ``stage`` needs (all for None); splits already built are kept."""
        if stage is not None and stage not in _STAGE_SPLITS:
            raise DataOptionError(f"stage must be one of {sorted(_STAGE_SPLITS)} or None, got {stage!r}")
        needed = ("train", "val", "test") if stage is None else _STAGE_SPLITS[stage]
        if any(split not in self._splits for split in needed if split != "test"):
            self._setup_fit_splits()
        if "test" in needed and "test" not in self._splits:
            test = self._raw_split("test", required=True)
            indices = None
            if self.test_subset is not None:
                indices = balanced_subset(test.targets, self.test_subset, TEST_SUBSET_SEED, name="test_subset")
            self._splits["test"] = TransformedSubset(test, indices, self.build_transform(is_training=False))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", stage="fit", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", stage="validate", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", stage="test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", stage="predict", shuffle=False)

    def dataset(self, split: str) -> TransformedSubset:
        """The transformed dataset of ``split`` ('train', 'val' or 'test'), set up on first use."""
        if split not in ("train", "val", "test"):
            raise DataOptionError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if split not in self._splits:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self._splits[split]

    def _setup_fit_splits(self) -> None:
        train = self._raw_split("train", required=True)
        eval_transform = self.build_transform(is_training=False)
        train_indices: list[int] | None = None
        if self.val_fraction > 0:
            train_indices, val_indices = stratified_split(train.targets, self.val_fraction, self.seed)
            self._splits["val"] = TransformedSubset(train, val_indices, eval_transform)
        else:
            held_out = self._raw_split("val", required=False)
            held_out = self._raw_split("test", required=True) if held_out is None else held_out
            self._splits["val"] = TransformedSubset(held_out, None, eval_transform)
        if self.train_subset is not None:
            train_indices = balanced_subset(train.targets, self.train_subset, self.seed, among=train_indices)
        self._splits["train"] = TransformedSubset(train, train_indices, self.build_transform(is_training=True))

    def _raw_split(self, split: str, *, required: bool) -> Dataset | None:
        if self._raw.get(split) is None:
            dataset = self._load_split(split, required=required)
            # Before any split or subset is drawn, so their indices only ever point at readable images.
            if self.skip_bad_images and isinstance(dataset, DatasetFolder):
                self._skipped[str(dataset.root)] = drop_unreadable(dataset)
            self._raw[split] = dataset
        return self._raw[split]

    def _loader(self, split: str, *, stage: str, shuffle: bool) -> DataLoader:
        if split not in self._splits:
            self.setup(stage)
        # The shuffled (training) order is resumable mid-epoch: see lora_vision.data.resumable.
        loader = ResumableDataLoader if shuffle else DataLoader
        return loader(
            self._splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            # Pinning needs an accelerator; without one torch only warns, on every loader.
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )


def resolve_num_workers(value: int | str) -> int:
    """The worker count of the ``num_workers`` option: an integer >= 0, or ``"auto"`` (see ImageDataModule)."""
    if value == "auto":
        # The cores this process may run on, which a container or taskset can make fewer than the machine's.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(MAX_AUTO_WORKERS, cores - 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataOptionError(f"num_workers must be an integer >= 0 or 'auto', got {value!r}")
    return value


def check_int(name: str, value: object, *, minimum: int) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataOptionError(f"{name} must be an integer >= {minimum}, got {value!r}")
