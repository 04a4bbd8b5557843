"""Image transforms that follow a backbone's timm data config, built by timm's own transform factory."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.transforms import MaybePILToTensor
from torchvision.transforms.v2.functional import get_size

from lora_vision.data.errors import DataOptionError

# What timm.data.resolve_model_data_config returns for a model without a pretrained config.
DEFAULT_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": DEFAULT_CROP_PCT,
    "crop_mode": "center",
}

_FACTORY_PARAMETERS = inspect.signature(create_transform).parameters
_FACTORY_ARGS = frozenset(_FACTORY_PARAMETERS) - {"is_training"}

AugmentConfig = bool | Mapping[str, Any]


def normalize_data_config(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-dict copy of a timm data config (e.g. a Hydra DictConfig), with lists turned into tuples.

    Raises ValueError for keys ``timm.data.create_transform`` does not accept, or an ``input_size`` that
    is not ``(channels, height, width)``.
    """
    config = _plain(data_config, "data_config")
    input_size = config.get("input_size")
    if input_size is not None and (
        not isinstance(input_size, tuple) or len(input_size) != 3 or not all(isinstance(n, int) for n in input_size)
    ):
        raise DataOptionError(f"data_config['input_size'] must be (channels, height, width), got {input_size!r}")
    return config


def build_transform(
    data_config: Mapping[str, Any],
    *,
    is_training: bool,
    augment: AugmentConfig = True,
    source_size: tuple[int, int] | None = None,
) -> Callable[[Any], Any]:
    """The PIL-image -> normalized tensor transform for ``data_config``.

    Evaluation: resize to ``input_size / crop_pct`` and center-crop to ``input_size`` (timm's eval path),
    so ``crop_pct=1.0`` keeps a 32 px CIFAR image whole at 32 px. Training with ``augment=True``: timm's
    default training pipeline (random-resized crop, horizontal flip, color jitter); a mapping instead
    passes its entries (e.g. ``auto_augment``, ``re_prob``, ``hflip``, ``scale``) on to
    ``timm.data.create_transform``. ``augment=False`` trains on the evaluation transform.

    With ``source_size`` (height, width), the per-image half of the batched pipeline instead (the
    ``resize_on_device`` datamodule option): every image must have that size (ValueError otherwise), the
    training augmentation runs at that size (the random-resized crop outputs ``source_size``), and the result
    is a uint8 (C, H, W) tensor that :class:`lora_vision.data.batched.BatchTransform` later resizes to
    ``input_size`` and normalizes, a whole batch at a time. Random erasing, which timm applies to normalized
    tensors, is then left to the batch step too.
    """
    if not isinstance(augment, bool | Mapping):
        raise DataOptionError(f"train_augment must be a bool or a mapping of timm transform options, got {augment!r}")
    config = normalize_data_config(data_config)
    if is_training and augment is False:
        # timm's own no_aug training path ignores crop_pct; an unaugmented baseline should see exactly
        # the pixels evaluation sees.
        is_training = False
    if is_training and isinstance(augment, Mapping):
        config.update(_plain(augment, "train_augment"))
    if source_size is None:
        return create_transform(**config, is_training=is_training)
    if not is_training:
        return SourceSizeCheck(source_size, MaybePILToTensor())
    channels = config.get("input_size", DEFAULT_DATA_CONFIG["input_size"])[0]
    config["input_size"] = (channels, *source_size)
    # timm's prefetcher mode: the same augmentation, ending in a uint8 tensor instead of normalized floats.
    return SourceSizeCheck(source_size, create_transform(**config, is_training=True, use_prefetcher=True))


def factory_default(name: str) -> Any:
    """The default of a ``timm.data.create_transform`` argument (e.g. ``re_mode``)."""
    return _FACTORY_PARAMETERS[name].default


class SourceSizeCheck:
    """Applies ``transform`` to images of exactly ``source_size`` (height, width); ValueError for any other size.

    The batched pipeline resizes every batch from one fixed size, so an image of another size would either
    break collation or, after a random crop back to the fixed size, be silently distorted.
    """

    def __init__(self, source_size: tuple[int, int], transform: Callable[[Any], Any]) -> None:
        self.source_size = tuple(source_size)
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        size = tuple(get_size(image))
        if size != self.source_size:
            height, width = self.source_size
            raise DataOptionError(
                f"resize_on_device=true needs every image at {height}x{width} px (height x width), got one of "
                f"{size[0]}x{size[1]}; set the datamodule option resize_on_device=false (Hydra: "
                "data.resize_on_device=false) for data of other or varying sizes"
            )
        return self.transform(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source_size={self.source_size}, transform={self.transform!r})"


def _plain(options: Mapping[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(options) - _FACTORY_ARGS)
    if unknown:
        raise DataOptionError(
            f"{what} has keys {unknown} that timm.data.create_transform does not accept; "
            f"valid keys: {sorted(_FACTORY_ARGS)}"
        )
    return {
        key: tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
        for key, value in options.items()
    }
