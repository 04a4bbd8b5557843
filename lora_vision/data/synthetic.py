"""A generated, learnable image dataset for tests and smoke runs: no files, no downloads."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lora_vision.data.base import ImageDataModule, check_int


class SyntheticImageDataset(Dataset):
    """``num_samples`` images ``prototypes[label] + noise * N(0, 1)``, labels balanced and shuffled.

    Each item is generated on access from its own seed, so memory stays small at any image size and
    the data is identical across runs, workers and processes.
    """

    def __init__(self, prototypes: torch.Tensor, num_samples: int, noise: float, seed: int) -> None:
        self.prototypes = prototypes
        self.noise = noise
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(num_samples) % len(prototypes)
        self.targets: list[int] = labels[torch.randperm(num_samples, generator=generator)].tolist()
        self._item_seed = int(torch.randint(2**62, (1,), generator=generator))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        target = self.targets[index]
        generator = torch.Generator().manual_seed(self._item_seed + index)
        prototype = self.prototypes[target]
        return prototype + self.noise * torch.randn(prototype.shape, generator=generator), target


class SyntheticDataModule(ImageDataModule):
    """Seeded synthetic classification data that a model can learn above chance in a few steps.

    Every class has a smooth random mean image (a 4x4 pattern upsampled to the image size); samples add
    Gaussian noise. Images are already normalized tensors, so ``data_config`` contributes only its
    ``input_size``, ``train_augment`` is ignored and ``resize_on_device`` (nothing to resize) is refused.

    Options (besides those of :class:`ImageDataModule`):
        num_classes: number of classes.
        num_samples: training images (before the validation split).
        num_test_samples: test images.
        image_size: height and width when ``data_config`` gives no ``input_size``; 3 channels.
        noise: standard deviation of the per-pixel noise (the class patterns have unit scale).
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        num_samples: int = 512,
        num_test_samples: int = 256,
        image_size: int = 32,
        noise: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_int("num_classes", num_classes, minimum=1)
        check_int("num_samples", num_samples, minimum=1)
        check_int("num_test_samples", num_test_samples, minimum=1)
        check_int("image_size", image_size, minimum=1)
        self._num_classes = num_classes
        self.num_samples = num_samples
        self.num_test_samples = num_test_samples
        self.image_size = image_size
        self.noise = float(noise)

    @property
    def class_names(self) -> list[str]:
        return [f"class_{i}" for i in range(self._num_classes)]

    def default_data_config(self) -> dict[str, Any]:
        return {**super().default_data_config(), "input_size": (3, self.image_size, self.image_size)}

    def build_transform(self, *, is_training: bool) -> None:
        return None

    def _load_split(self, split: str, *, required: bool) -> Dataset | None:
        if split == "val":
            return None
        channels, height, width = self.resolved_data_config["input_size"]
        # One generator draws the class patterns, shared by both splits, then each split's own seed.
        generator = torch.Generator().manual_seed(self.seed)
        coarse = torch.randn(self._num_classes, channels, 4, 4, generator=generator)
        prototypes = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        train_seed, test_seed = torch.randint(2**62, (2,), generator=generator).tolist()
        if split == "train":
            return SyntheticImageDataset(prototypes, self.num_samples, self.noise, train_seed)
        return SyntheticImageDataset(prototypes, self.num_test_samples, self.noise, test_seed)
