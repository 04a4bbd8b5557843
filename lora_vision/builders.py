"""Objects built from the composed run config, shared by every tool that reads one (train, evaluate, bench).

Kept apart from `lora_vision.train`, the entry point, so that no tool imports the training script.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lora_vision.config_checks import ConfigError
from lora_vision.errors import UserError

# Keys of the `data` group that describe the model input rather than the datamodule; they reach the
# datamodule through its `data_config`.
INPUT_KEYS = ("image_size", "crop_pct")


def instantiate_validated(cfg: DictConfig) -> Any:
    """`instantiate(cfg)` for classes whose constructors validate their options.

    Hydra wraps constructor errors in its own exception; the constructor's UserError already names the key,
    the bad value and the valid ones, so it is raised as is.
    """
    try:
        return instantiate(cfg, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def build_method(lora_cfg: DictConfig) -> Any:
    """The fine-tuning method of the `lora` group (LoRA, LinearProbe or FullFineTune)."""
    return instantiate_validated(lora_cfg)


def build_datamodule(data_cfg: DictConfig) -> L.LightningDataModule:
    """The datamodule of the `data` group, without its input-size keys (they go into `data_config` later)."""
    options = {key: value for key, value in data_cfg.items() if key not in INPUT_KEYS}
    return instantiate_validated(OmegaConf.create(options))


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a logger or callback group (none when the group is null)."""
    if not group:
        return []
    return [instantiate(entry, _convert_="all") for entry in group.values() if "_target_" in entry]


def check_num_classes(model_classes: int, data_classes: int, model_name: str, data_target: str) -> None:
    if model_classes != data_classes:
        raise ConfigError(
            f"model.num_classes={model_classes} does not match the {data_classes} classes of the data "
            f"({data_target}); set model.num_classes=null to size the {model_name} head from the data"
        )
