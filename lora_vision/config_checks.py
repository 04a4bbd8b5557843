"""Checks of the composed run config, so a bad value fails before any model is built or data is read.

Unknown keys and group options on the command line are refused before Hydra starts (`lora_vision.cli`), data keys
of another dataset by `lora_vision.composition`; these checks cover values, keys added with `+` that nothing reads,
and accelerators the machine lacks. LoRA settings are checked by the method classes themselves
(`lora_vision.methods`), data options by the datamodules.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from lora_vision.errors import UserError


class ConfigError(UserError, ValueError):
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
        # Experiments set their warmup for their own length (10 epochs of 100 for VTAB-1k), so a shorter run asked
        # for on the command line (trainer.max_epochs=1) meets this first; the message gives the setting to add.
        raise ConfigError(
            f"optim.warmup_epochs={warmup!r} is invalid: the warmup must be shorter than trainer.max_epochs="
            f"{max_epochs}; add optim.warmup_epochs=0 (no warmup) or a value below {max_epochs} (fractions allowed, "
            f"e.g. optim.warmup_epochs={max_epochs / 10:g})"
        )
    if max_epochs == -1 and cfg.trainer.get("max_steps", -1) in (None, -1):
        raise ConfigError("trainer.max_epochs=-1 is invalid without trainer.max_steps: training would never end")


# Where a key added with `+key=value` is read: Trainer arguments, timm model kwargs, extra callbacks and loggers
# (each entry with a `_target_`), and Hydra's own settings. Everywhere else every key the framework reads is in the
# config already, so an added one would be silently ignored (or fail deep inside a constructor).
OPEN_PREFIXES = ("trainer.", "model.kwargs.", "callbacks.", "logger.", "hydra.")


def check_appended_keys(overrides: Sequence[str], groups: Collection[str], cfg: DictConfig) -> None:
    """Raise ConfigError for a `+key=value` override outside OPEN_PREFIXES, naming the closest existing keys.

    `groups` are the config groups of the composition (Hydra's runtime choices): `+group=option` selects a config
    and is not a key.
    """
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if not override.is_add() or key in groups or "/" in key or (key + ".").startswith(OPEN_PREFIXES):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        siblings = [name for name in node if name != leaf] if isinstance(node, DictConfig) else []
        close = [f"{parent}.{name}" if parent else name for name in difflib.get_close_matches(leaf, siblings, n=3)]
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(
            f"+{key}={override.value()!r} adds a key that lora_vision does not read; {hint}Existing keys take no +, "
            f"and keys can be added only under {', '.join(OPEN_PREFIXES)}"
        )


def check_accelerator(cfg: DictConfig) -> None:
    """Raise ConfigError when the config asks for a GPU this machine does not have, before any download."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is available on this machine; train on the CPU with "
            "trainer=cpu (or debug=limit for a quick check)"
        )
