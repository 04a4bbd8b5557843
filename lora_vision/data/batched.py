"""The batched half of the ``resize_on_device`` pipeline: resize and normalize a whole uint8 batch at once.

Small fixed-size sources (CIFAR's 32 px) trained at 224 px are the classic input-pipeline trap: resizing and
normalizing each image in PIL costs about 1.3 ms per image on a CPU core and ships 196 times the bytes of
the source pixels through the DataLoader (49x the pixels, as float32). Here the workers only augment at the
source size and collate uint8 tensors; one batched resize on the accelerator does the rest.

Agreement with the per-image PIL path (``tests/test_data_pipeline.py`` asserts it): on 64 random 32 px
images, bicubic and bilinear, to 16, 64 and 224 px, crop_pct 1.0 and 0.875, the evaluation tensors differ by
at most 1.10 uint8 levels of the source pixels and by 0.35 on average (normalized with ImageNet's std: at most
0.019, mean 0.006), because PIL rounds to uint8 between and after its passes. Training crops are resized
to the source size per image and then to the input size in the batch, so they are slightly softer than PIL's
single resize from the crop; crop positions, scales and flips are drawn alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from timm.data import DEFAULT_CROP_PCT
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from lora_vision.data.errors import DataOptionError
from lora_vision.data.transforms import AugmentConfig, factory_default, normalize_data_config

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
_ERASING_ARGS = {"re_mode": "mode", "re_count": "max_count", "re_num_splits": "num_splits"}


class BatchTransform:
    """uint8 images (N, C, h, w) at ``source_size`` -> float (N, C, H, W) at the data config's input size.

    Evaluation (and training with ``augment=False``, which trains on the evaluation transform): timm's
    evaluation geometry, batched: resize to ``input_size / crop_pct`` (the shorter side for ``crop_mode``
    'center', each side for 'squash') and center-crop to ``input_size``. Training with augmentation: the images
    were random-resized-cropped at the source size, so they are stretched to ``input_size`` as timm's crop
    output is; random erasing (``re_prob`` in an ``augment`` mapping) follows on the normalized batch, as in
    timm's prefetcher. Then both normalize with the config's mean and std.

    Raises ValueError, naming ``resize_on_device``, for a config this cannot mirror (an interpolation other
    than nearest/bilinear/bicubic, ``crop_mode`` 'border', ``crop_border_pixels``).
    """

    def __init__(
        self,
        data_config: Mapping[str, Any],
        source_size: tuple[int, int],
        *,
        is_training: bool,
        augment: AugmentConfig = True,
    ) -> None:
        config = normalize_data_config(data_config)
        self.interpolation = _interpolation(config.get("interpolation", "bilinear"))
        self.mean = list(config["mean"])
        self.std = list(config["std"])
        input_size = tuple(config["input_size"][-2:])
        augmented = is_training and augment is not False
        options = dict(augment) if augmented and isinstance(augment, Mapping) else {}
        if augmented:
            self.resize_to, self.crop_to = input_size, None
        else:
            self.resize_to = _eval_resize(tuple(source_size), input_size, config)
            self.crop_to = None if self.resize_to == input_size else input_size
        self.erasing: dict[str, Any] | None = None
        if options.get("re_prob", 0) > 0:
            self.erasing = {"probability": options["re_prob"]}
            self.erasing |= {arg: options.get(key, factory_default(key)) for key, arg in _ERASING_ARGS.items()}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataOptionError(
                f"the resize_on_device batch step takes uint8 (N, C, H, W) images, got {images.dtype} of shape "
                f"{tuple(images.shape)} (was it applied twice?)"
            )
        batch = _resize_like_pil(TF.to_dtype(images, torch.float32, scale=True), self.resize_to, self.interpolation)
        if self.crop_to is not None:
            batch = TF.center_crop(batch, list(self.crop_to))
        batch = TF.normalize(batch, self.mean, self.std, inplace=True)
        if self.erasing is not None:
            batch = RandomErasing(**self.erasing, device=batch.device)(batch)
        return batch


def _interpolation(name: str) -> InterpolationMode:
    if name not in _INTERPOLATIONS:
        raise DataOptionError(
            f"resize_on_device=true resizes tensors, which supports interpolation {sorted(_INTERPOLATIONS)}; the data "
            f"config asks for {name!r}: set resize_on_device=false"
        )
    return _INTERPOLATIONS[name]


def _eval_resize(source: tuple[int, int], target: tuple[int, int], config: Mapping[str, Any]) -> tuple[int, int]:
    """The (height, width) timm's evaluation transform resizes a ``source``-sized image to, before its center crop."""
    crop_pct = config.get("crop_pct") or DEFAULT_CROP_PCT
    crop_mode = config.get("crop_mode") or "center"
    scale = tuple(math.floor(n / crop_pct) for n in target)
    if not config.get("crop_border_pixels"):
        if crop_mode == "squash":
            return scale
        if crop_mode == "center" and scale[0] == scale[1]:
            # torchvision's Resize(int): the shorter side to `scale`, the longer one in proportion, rounded down.
            short, long = sorted(source)
            longer = int(scale[0] * long / short)
            return (scale[0], longer) if source[0] <= source[1] else (longer, scale[0])
    raise DataOptionError(
        f"resize_on_device=true mirrors timm's evaluation crop for crop_mode 'center' (square input_size) or "
        f"'squash'; the data config has crop_mode={config.get('crop_mode')!r}, input_size {target}, "
        f"crop_border_pixels={config.get('crop_border_pixels')!r}: set resize_on_device=false"
    )


def _resize_like_pil(batch: torch.Tensor, size: tuple[int, int], interpolation: InterpolationMode) -> torch.Tensor:
    # PIL resizes the width first and stores that pass as uint8, which clips bicubic overshoot; a single 2-D
    # tensor resize keeps the overshoot and differs from PIL by up to 0.42 (normalized) on noisy images, these
    # two clipped passes by 0.02. The antialiased kernels are PIL's, for upscaling too.
    batch = TF.resize(batch, [batch.shape[-2], size[1]], interpolation=interpolation, antialias=True).clamp_(0, 1)
    return TF.resize(batch, list(size), interpolation=interpolation, antialias=True).clamp_(0, 1)
