"""Speed and memory options of a training run (`perf.*`): torch.compile, channels-last, gradient checkpointing.

bf16 autocast is Lightning's: `trainer.precision=bf16-mixed`. Each option leaves parameter names, and so
checkpoints, adapter files and exports, exactly as they are without it. What each costs or gains is measured by
`python -m lora_vision.bench` (its options table).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import use_reentrant_ckpt
from torch import nn

from lora_vision.errors import UserError

OPTIONS = ("compile", "channels_last", "grad_checkpointing")
# What a perf.compile mapping may set: torch.compile's keyword arguments (the model is the positional one).
COMPILE_OPTIONS = frozenset(inspect.signature(torch.compile).parameters) - {"model"}


class PerformanceOptionError(UserError, ValueError):
    """A `perf.*` option cannot be applied to this model; the message names the option and the fix."""


def apply_performance_options(
    model: nn.Module,
    *,
    compile: bool | Mapping[str, Any] = False,
    channels_last: bool = False,
    grad_checkpointing: bool = False,
) -> nn.Module:
    """Apply the options to `model` in place (after adapters are added) and return it.

    compile: `nn.Module.compile()`, True or a mapping of `torch.compile` options (e.g. `{"mode":
        "max-autotune"}`). In place rather than `torch.compile(model)`, whose wrapper would prefix every
        state-dict key with `_orig_mod.`.
    channels_last: NHWC weights, so convolutions take the NHWC kernels (faster on tensor-core GPUs and with
        oneDNN); a convolution with an NHWC weight also returns NHWC activations.
    grad_checkpointing: timm's per-block checkpointing: activations inside each block are recomputed in the
        backward pass instead of kept. Frozen blocks below the lowest adapter need no backward pass at all, so
        the recomputation is paid only from the lowest adapted block up.
    """
    for name, value in (("channels_last", channels_last), ("grad_checkpointing", grad_checkpointing)):
        if not isinstance(value, bool):
            raise PerformanceOptionError(f"perf.{name}={value!r} is invalid: expected true or false")
    if not isinstance(compile, bool | Mapping):
        raise PerformanceOptionError(f"perf.compile={compile!r} is invalid: expected true, false or a mapping")
    unknown = sorted(set(compile) - COMPILE_OPTIONS) if isinstance(compile, Mapping) else []
    if unknown:
        raise PerformanceOptionError(
            f"perf.compile has keys {unknown} that torch.compile does not take; valid: {sorted(COMPILE_OPTIONS)}"
        )
    if grad_checkpointing:
        enable_grad_checkpointing(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile(**(dict(compile) if isinstance(compile, Mapping) else {}))
    return model


def enable_grad_checkpointing(model: nn.Module) -> None:
    """timm's `set_grad_checkpointing(True)`, refused where it would silently drop adapter gradients.

    Re-entrant checkpointing (`TIMM_REENTRANT_CKPT=1`) computes no gradients inside a block whose input does not
    require them, which is the case for every block above a frozen stem: its adapters would never train.
    """
    if not hasattr(model, "set_grad_checkpointing"):
        raise PerformanceOptionError(
            f"perf.grad_checkpointing=true: {type(model).__name__} has no set_grad_checkpointing(); "
            "timm ViTs, ResNets, ConvNeXts and EfficientNets have it"
        )
    if use_reentrant_ckpt():
        raise PerformanceOptionError(
            "perf.grad_checkpointing=true needs non-reentrant checkpointing, but timm is set to re-entrant "
            "(TIMM_REENTRANT_CKPT): adapters behind a frozen stem would get no gradients; unset it"
        )
    model.set_grad_checkpointing(True)
