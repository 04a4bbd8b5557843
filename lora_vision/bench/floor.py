"""The floor: what any LoRA training step must cost at the least, measured on the same model.

Every LoRA implementation runs the full forward pass and back-propagates activation gradients from the loss down
to the adapted layers; nothing else in the step is unavoidable. The floor model is the unadapted model with
every weight frozen and each adapted layer's *output* marked as requiring grad (a forward hook), so autograd
computes exactly those activation gradients and no weight gradient, and there is no optimizer step.

Why the output and not the input of the lowest adapted layer: an adapter's weight gradients need the layer's
input x (kept from the forward) and the gradient g at its output (dB = g (A x)^T, dA = B^T g x^T). Nothing below
the lowest adapted layer trains, so no LoRA needs the gradient at that layer's input, and a floor that asked for
it would add W0^T g (for a qkv Linear as many FLOPs as its forward) that LoRA never pays, flattering the ratio.
Every adapted layer is marked, not only the lowest, because adapted layers can sit on parallel branches (a
ResNet downsample beside its block's convs) whose gradients LoRA needs even though they lie off the path from
the loss to the lowest one.

The marked outputs are autograd leaves, so backward hands each its gradient (no copy: the gradient is stolen,
not accumulated) and the tensor is freed with the step's activations.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def _output_requires_grad(module: nn.Module, args: tuple, output: Tensor) -> None:
    # Outputs downstream of an earlier marked layer already require grad; only the first ones become leaves.
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


def attach_floor(model: nn.Module, module_names: Iterable[str]) -> nn.Module:
    """Turn `model` in place into the floor for adapters on `module_names`: frozen, outputs requiring grad."""
    names = list(module_names)
    if not names:
        raise ValueError("the floor needs at least one adapted module")
    model.requires_grad_(False)
    for name in names:
        model.get_submodule(name).register_forward_hook(_output_requires_grad)
    return model
