"""Matmul and convolution FLOPs of one forward + backward per side, counted on the meta device.

The FLOP ratio ours/floor is what an implementation with no other overhead would reach: the adapters' own
matmuls and convolutions (A x, B h and their gradients). Anything the measured time ratio adds on top is
elementwise work, memory traffic and Python dispatch. Counting needs only shapes, so the model is built on the
meta device and costs no memory and no compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lora_vision.bench.configs import BenchConfig, Settings
from lora_vision.bench.sides import prepare_side


def step_flops(config: BenchConfig, side: str, settings: Settings) -> int:
    spec = settings.model(config)
    size = settings.batch(spec)
    with torch.device("meta"):
        model = prepare_side(spec.create(), config, side, settings)
        images = torch.empty(size, 3, spec.image_size, spec.image_size)
        labels = torch.zeros(size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops()
