"""Matmul and convolution FLOPs of one forward + backward per side, counted on the meta device.

The FLOP ratio ours/floor is what an implementation with no other overhead would reach: the adapters' own
matmuls and convolutions (A x, B h and their gradients). Anything the measured time ratio adds on top is
elementwise work, memory traffic and Python dispatch. Counting needs only shapes, so the model is built on the
meta device and costs no memory and no compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from lora_vision.bench.configs import BenchConfig, Settings
from lora_vision.bench.sides import prepare_side


def _conv_backward_flops(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    **kwargs: Any,
) -> int:
    """A convolution's input and/or kernel gradient: each as many multiply-adds as its forward pass.

    torch's own formula counts the kernel gradient of a grouped conv as if it were ungrouped, `groups` times too
    many (1,152 times for EfficientNet's widest depthwise conv)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(run: Callable[[], object]) -> int:
    """Matmul and convolution FLOPs of `run()` (grouped convolutions' gradients counted per group)."""
    corrected = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=corrected) as counter:
        run()
    return counter.get_total_flops()


def step_flops(config: BenchConfig, side: str, settings: Settings) -> int:
    spec = settings.model(config)
    size = settings.batch(spec)
    with torch.device("meta"):
        model = prepare_side(spec.create(), config, side, settings)
        images = torch.empty(size, 3, spec.image_size, spec.image_size)
        labels = torch.zeros(size, dtype=torch.long)
    return count_flops(lambda: F.cross_entropy(model(images), labels).backward())
