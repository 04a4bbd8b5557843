"""The error types of LoRA settings and of PEFT's format, and the checks every entry point shares."""

from __future__ import annotations

import math
from typing import Any

from lora_vision.errors import UserError


class LoRAConfigError(UserError, ValueError):
    """A LoRA setting is invalid. Raised before any module is modified."""


class PeftFormatError(UserError, ValueError):
    """An adapter that PEFT's format cannot carry exactly, or a PEFT adapter lora_vision cannot map."""


def is_positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value > 0


def check_hyperparameters(rank: int, alpha: float | None, dropout: float) -> None:
    """Validate rank, alpha and dropout; the message names the bad value and the valid range."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAConfigError(f"lora.rank must be an integer >= 1, got {rank!r}")
    if alpha is not None and not is_positive_number(alpha):
        raise LoRAConfigError(f"lora.alpha must be a finite number > 0 (or None for alpha = rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise LoRAConfigError(f"lora.dropout must be in [0, 1), got {dropout!r}")
