"""Shared fixtures: tiny, randomly initialised timm models and paths to optional real assets."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

# Real data and weights may sit beside the checkout; tests that use them skip when they are absent.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EFFNET_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"

TINY_VIT = dict(depth=4, embed_dim=64, num_heads=2, img_size=32, patch_size=8, num_classes=10)


def tiny_vit(**overrides) -> nn.Module:
    return timm.create_model("vit_small_patch16_224", pretrained=False, **{**TINY_VIT, **overrides}).eval()


def tiny_resnet(name: str = "resnet18", **kwargs) -> nn.Module:
    # timm zero-initialises each residual branch's last BN; that would hide any adapter inside the branch.
    return timm.create_model(name, pretrained=False, num_classes=10, zero_init_last=False, **kwargs).eval()


def randomize_adapters(model: nn.Module, std: float = 0.1) -> None:
    """Give every adapter non-zero A and B, so the update is visible in the outputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)
