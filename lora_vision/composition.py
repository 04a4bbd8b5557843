"""Composing run configs as `python -m lora_vision.train` does, for checks that compare one choice with another.

Such a check may run before Hydra starts (the command-line checks of `lora_vision.cli`) or inside a job (the data
keys of `check_data_keys`); either way it composes from the same config directory with Hydra's own loader.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from hydra import initialize_config_dir
from hydra.core.config_loader import ConfigLoader
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lora_vision.config_checks import ConfigError
from lora_vision.results import PROJECT_ROOT

CONFIG_DIR = PROJECT_ROOT / "conf"
CONFIG_NAME = "train"

# Groups declared `null` in conf/train.yaml's defaults list, so that they merge in that list's order (experiment,
# then sweep, then debug) whatever the order on the command line; each may set keys of any other group.
ORDERED_GROUPS = ("exp", "sweep", "debug")


@contextmanager
def run_config_loader() -> Iterator[ConfigLoader]:
    """Hydra's loader of the run config: the running application's, or else one for conf/ while the block runs."""
    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance().config_loader()
        return
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def compose(loader: ConfigLoader, overrides: Sequence[str]) -> DictConfig:
    """The config (Hydra's node included) of one run with `overrides`, which must hold no sweep."""
    return loader.load_configuration(CONFIG_NAME, list(overrides), run_mode=RunMode.RUN)


def _command_line_spelling(group: str, option: str) -> str:
    """`+exp=NAME` and `+sweep=NAME` as the documentation writes them; any other group without the `+`."""
    return f"+{group}={option}" if group in ("exp", "sweep") else f"{group}={option}"


@functools.cache
def dataset_keys(option: str) -> frozenset[str]:
    """The keys of `data=option` as its own config file (conf/data/<option>.yaml) composes them."""
    with run_config_loader() as loader:
        return frozenset(compose(loader, [f"data={option}"]).data)


def _keys_set_by(group: str, option: str, data_option: str, keys: Sequence[str]) -> list[str]:
    with run_config_loader() as loader:
        composed = compose(loader, [f"{group}={option}", f"data={data_option}"]).data
    return [key for key in keys if key in composed]


def _own_dataset(group: str, option: str) -> str | None:
    with run_config_loader() as loader:
        return compose(loader, [f"{group}={option}"]).hydra.runtime.choices.get("data")


def check_data_keys(cfg: DictConfig) -> None:
    """Raise ConfigError for `data` keys that the chosen dataset does not have, naming the config that set them.

    An experiment sets keys of its own dataset (the synthetic one's `num_classes`, VTAB-1k's `task`); on top of
    another dataset (`+exp=smoke data=cifar10`) they would reach a datamodule that does not take them and fail
    there as a TypeError. Which dataset was chosen is Hydra's runtime choice: without Hydra there is nothing to check.
    """
    if not HydraConfig.initialized():
        return
    choices = HydraConfig.get().runtime.choices
    data_option = choices.get("data")
    if data_option is None:
        return
    extra = [key for key in cfg.data if key not in dataset_keys(data_option)]
    if not extra:
        return
    sources, suggestions = [], []
    for group in ORDERED_GROUPS:
        option = choices.get(group)
        if option is None or not (keys := _keys_set_by(group, option, data_option, extra)):
            continue
        own = _own_dataset(group, option)
        sources.append((_command_line_spelling(group, option), keys, own if own != data_option else None))
        if own not in (None, data_option) and dataset_keys(own) >= set(extra):
            suggestions.append(f"data={own}")
    origin = " and ".join(
        f"{spelling}" + (f" ({', '.join(keys)})" if len(sources) > 1 else "") + (f" for data={own}" if own else "")
        for spelling, keys, own in sources
    )
    datamodule = cfg.data._target_.rpartition(".")[2]
    them = "them" if len(extra) > 1 else "it"
    raise ConfigError(
        f"data={data_option} has no key{'s' if len(extra) > 1 else ''} {', '.join(extra)} "
        f"(set by {origin or 'the command line'}); {datamodule} would not take {them}. Drop {them} "
        f"({' '.join(f'~data.{key}' for key in extra)}) or pick a dataset that has {them}"
        + (f" ({', '.join(suggestions)})" if suggestions else "")
    )
