"""The LoRA family: each module here (but `base`) defines one `LoraVariant`, found on import.

Adding a variant is one module here, the `LoraConfig` field that switches it on, and one
`conf/lora/<name>.yaml`; the layers, `apply_lora`, results files, the report and the tests that hold every variant
to its exactness properties find it in `VARIANTS`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from lora_vision.lora.variants.base import LoraVariant


def _discover() -> tuple[type[LoraVariant], ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, LoraVariant) and obj.__module__ == module.__name__
        ]
    # Name order, so a combination always has the same name ("dora+pissa+rslora") and its hooks the same order.
    return tuple(sorted((cls for cls in found if cls is not LoraVariant), key=lambda cls: cls.name))


VARIANTS = _discover()

__all__ = ["VARIANTS", "LoraVariant"]
