"""Image transforms that follow a backbone's timm data config, built by timm's own transform factory."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

# What timm.data.resolve_model_data_config returns for a model without a pretrained config.
DEFAULT_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": DEFAULT_CROP_PCT,
    "crop_mode": "center",
}

_FACTORY_ARGS = frozenset(inspect.signature(create_transform).parameters) - {"is_training"}

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
        raise ValueError(f"data_config['input_size'] must be (channels, height, width), got {input_size!r}")
    return config


def build_transform(
    data_config: Mapping[str, Any], *, is_training: bool, augment: AugmentConfig = True
) -> Callable[[Any], Any]:
    """The PIL-image -> normalized tensor transform for ``data_config``.

    Evaluation: resize to ``input_size / crop_pct`` and center-crop to ``input_size`` (timm's eval path),
    so ``crop_pct=1.0`` keeps a 32 px CIFAR image whole at 32 px. Training with ``augment=True``: timm's
    default training pipeline (random-resized crop, horizontal flip, color jitter); a mapping instead
    passes its entries (e.g. ``auto_augment``, ``re_prob``, ``hflip``, ``scale``) on to
    ``timm.data.create_transform``. ``augment=False`` trains on the evaluation transform.
    """
    if not isinstance(augment, bool | Mapping):
        raise ValueError(f"train_augment must be a bool or a mapping of timm transform options, got {augment!r}")
    config = normalize_data_config(data_config)
    if is_training and augment is False:
        # timm's own no_aug training path ignores crop_pct; an unaugmented baseline should see exactly
        # the pixels evaluation sees.
        is_training = False
    if is_training and isinstance(augment, Mapping):
        config.update(_plain(augment, "train_augment"))
    return create_transform(**config, is_training=is_training)


def _plain(options: Mapping[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(options) - _FACTORY_ARGS)
    if unknown:
        raise ValueError(
            f"{what} has keys {unknown} that timm.data.create_transform does not accept; "
            f"valid keys: {sorted(_FACTORY_ARGS)}"
        )
    return {
        key: tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
        for key, value in options.items()
    }
