"""Checks of the composed run config, so a bad value fails before any model is built or data is read.

Hydra's struct mode already rejects unknown keys and unknown group options; these checks cover values. LoRA
settings are checked by the method classes themselves (`lora_vision.methods`), data options by the datamodules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the bad value and what is valid."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _fraction_below_one(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1


def _betas(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and all(_fraction_below_one(b) for b in value)


def _epochs(value: Any) -> bool:
    return _is_int(value) and (value >= 1 or value == -1)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


# key -> (check, description of the valid values)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_non_negative_int, "an integer >= 0"),
    "optim.lr": (_positive, "a number > 0"),
    "optim.weight_decay": (_non_negative, "a number >= 0"),
    "optim.betas": (_betas, "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    "optim.warmup_epochs": (_non_negative, "a number of epochs >= 0 (fractions allowed)"),
    "optim.min_lr": (_non_negative, "a number >= 0"),
    "module.label_smoothing": (_fraction_below_one, "a number in [0, 1)"),
    "data.image_size": (_positive_int, "an integer number of pixels > 0"),
    "data.crop_pct": (_optional(lambda v: _positive(v) and v <= 1), "null or a number in (0, 1]"),
    "data.batch_size": (_positive_int, "an integer > 0"),
    "trainer.max_epochs": (_epochs, "an integer >= 1 (or -1 with trainer.max_steps)"),
    "trainer.accumulate_grad_batches": (_positive_int, "an integer > 0"),
    "trainer.gradient_clip_val": (_optional(_positive), "null or a number > 0"),
    "model.num_classes": (_optional(_positive_int), "null (from the data) or an integer > 0"),
    "objective.param_penalty": (_non_negative, "a number >= 0 (accuracy per tenfold increase in parameters)"),
}


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value among RULES and the cross-key constraints."""
    for key, (check, valid) in RULES.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not check(value):
            raise ConfigError(f"{key}={value!r} is invalid: expected {valid}")
    max_epochs, warmup = cfg.trainer.max_epochs, cfg.optim.warmup_epochs
    if max_epochs > 0 and warmup >= max_epochs:
        raise ConfigError(
            f"optim.warmup_epochs={warmup!r} is invalid: it must be shorter than trainer.max_epochs={max_epochs}"
        )
    if max_epochs == -1 and cfg.trainer.get("max_steps", -1) in (None, -1):
        raise ConfigError("trainer.max_epochs=-1 is invalid without trainer.max_steps: training would never end")
