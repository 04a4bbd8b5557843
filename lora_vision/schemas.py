"""Structured configs that give Hydra groups their keys and defaults from the code that reads them.

The `lora` group's node is generated from `LoraConfig`, so `python -m lora_vision.train` and `apply_lora(...)`
share one set of defaults. Registered with Hydra's ConfigStore when Hydra loads lora_vision's plugin package
(`hydra_plugins.lora_vision_optuna`), as the Optuna sweeper's settings are.
"""

from __future__ import annotations

from dataclasses import Field, field, fields, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

from lora_vision.lora.config import LoraConfig

# The node conf/lora/lora.yaml extends (its defaults list names it as `/lora_schema@_here_`). Stored outside the
# `lora` group, so that it is not offered as a `lora=` option.
LORA_SCHEMA = "lora_schema"


def _default(value: Any) -> Field:
    # Tuples become lists, as YAML writes them; a mutable default needs a factory.
    if isinstance(value, tuple | list):
        return field(default_factory=lambda: list(value))
    return field(default=value)


def lora_schema() -> type:
    """A dataclass with `_target_` (the `LoRA` method) and one field per `LoraConfig` field, with its default.

    Fields are typed `Any`: `LoraConfig` checks every value and names the key and what is valid, where OmegaConf's
    own type errors would stop Hydra before that, with less to say.
    """
    entries = [("_target_", str, field(default="lora_vision.methods.LoRA"))]
    entries += [(f.name, Any, _default(f.default)) for f in fields(LoraConfig)]
    return make_dataclass("LoraSchema", entries)


def register_schemas() -> None:
    ConfigStore.instance().store(name=LORA_SCHEMA, node=lora_schema(), provider="lora_vision")
