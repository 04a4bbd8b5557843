"""Hugging Face PEFT's LoRA on the same timm model and modules, for the side-by-side comparison.

PEFT is a dev dependency, so it is imported only when a twin is built; without it the benchmark runs ours and
the floor alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Sequence

from torch import nn


def peft_version() -> str | None:
    if importlib.util.find_spec("peft") is None:
        return None
    return importlib.metadata.version("peft")


def peft_twin(model: nn.Module, module_names: Sequence[str], rank: int, alpha: float, dropout: float) -> nn.Module:
    """`model` (taken over) with PEFT LoRA adapters on exactly `module_names`, each whole; only they train.

    A regular expression naming the modules exactly (PEFT full-matches a string `target_modules`) makes the
    target set identical to ours by construction, whatever preset or block range chose it.
    """
    import peft

    pattern = "|".join(re.escape(name) for name in module_names)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    return peft.get_peft_model(model, config)


def peft_adapted_names(twin: nn.Module) -> list[str]:
    """Names (as in the original model) of the modules PEFT adapted."""
    return [name for name, module in twin.base_model.model.named_modules() if hasattr(module, "lora_A")]
