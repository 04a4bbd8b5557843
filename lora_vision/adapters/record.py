"""The JSON records beside adapter and export files, read as data, and the method record inside an adapter's.

Nothing read from these files is imported, called or instantiated. An adapter records its method as a name from
`lora_vision.methods.METHODS` and its settings, which that method's constructor validates (format version 2).
Adapters of format version 1 recorded a Hydra `_target_` instead: its string is looked up in `V1_TARGETS`, the
classes version 1 wrote, and anything else is refused.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from lora_vision.adapters.errors import AdapterFormatError
from lora_vision.lora import LoRAConfigError
from lora_vision.methods import METHODS, method_from_config

# The `_target_` of each method in version-1 adapter files, and the method's name now.
V1_TARGETS = {
    "lora_vision.methods.LoRA": "lora",
    "lora_vision.methods.LinearProbe": "linear_probe",
    "lora_vision.methods.BitFit": "bitfit",
    "lora_vision.methods.FullFineTune": "full",
}


def read_meta(file: Path, kind: str, versions: Collection[int]) -> dict[str, Any]:
    """A JSON record (`adapter.json`, `model.json`), refused with an `AdapterFormatError` unless it is an object of
    format `kind` in one of `versions`."""
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFormatError(
            f"{file} is not a JSON file ({err}); expected a {kind!r} record: if this is a truncated or damaged copy, "
            "copy it again from where it was made"
        ) from None
    found = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else (None, None)
    if found[0] != kind or found[1] not in versions:
        raise AdapterFormatError(
            f"{file}: unsupported format {found[0]!r} version {found[1]!r}; this lora_vision reads {kind!r} "
            f"version {' or '.join(map(str, versions))}"
        )
    return meta


# How a message names each JSON type a record's value may need.
JSON_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", type(None): "null"}


def check_value_types(
    record: Mapping[str, Any], types: Mapping[str, tuple[type, ...]], file: Path, key_prefix: str = ""
) -> None:
    """Refuse, with an `AdapterFormatError` naming `file` and the key, a value of `record` whose JSON type is not one
    of those `types` gives for its key (an absent key counts as null).

    A record damaged or edited into another type would otherwise fail far from it, inside model building. Types
    compare exactly, as JSON gives them: `true` is no integer here, though Python's bool is an int.
    """
    for key, allowed in types.items():
        value = record.get(key)
        if type(value) not in allowed:
            found = "is missing" if key not in record else f"is {json.dumps(value)}"
            raise AdapterFormatError(
                f"{file}: {key_prefix}{key} {found}, where {' or '.join(map(JSON_TYPE_NAMES.get, allowed))} is "
                "expected; if this is a damaged or edited copy, copy it again from where it was made"
            )


def _from_v1(method: Any, file: Path) -> dict[str, Any]:
    """A version-1 method record (`{"_target_": class path, **settings}`) as ``{"name", "settings"}``."""
    target = method.get("_target_") if isinstance(method, Mapping) else None
    if target not in V1_TARGETS:
        valid = ", ".join(f"{path} ({name})" for path, name in V1_TARGETS.items())
        raise AdapterFormatError(
            f"{file}: the method record names _target_ {target!r}, which is not a lora_vision method; a version-1 "
            f"adapter names one of {valid}"
        )
    return {"name": V1_TARGETS[target], "settings": {k: v for k, v in method.items() if k != "_target_"}}


def method_record(method: Any, file: Path, version: int) -> dict[str, Any]:
    """The method record of an adapter record of format `version`, as ``{"name", "settings"}``, checked by building
    the method it describes (which touches no model); an `AdapterFormatError` naming `file` otherwise."""
    record = _from_v1(method, file) if version == 1 else method
    try:
        method_from_config(record)
    except LoRAConfigError as err:
        raise AdapterFormatError(
            f"{file}: the recorded method cannot be rebuilt ({err}); an adapter names one of {', '.join(METHODS)} "
            "with its settings"
        ) from None
    return {"name": record["name"], "settings": dict(record["settings"])}
