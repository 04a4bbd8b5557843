"""Short real-data runs: real pretrained weights on real images, LoRA against the linear probe.

EfficientNet-Lite0 (ImageNet-1k) on CIFAR-10 with LoRA on the pointwise convolutions, and a pretrained ViT-Ti on
Imagewoof with LoRA on q,v: each must beat the linear probe trained with the same budget. Uses the offline
assets beside the checkout (../shared, see their READMEs) and skips when they are absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_vision.train import run
from tests.helpers import EFFNET_WEIGHTS as WEIGHTS
from tests.helpers import SHARED, composed

CIFAR10 = SHARED / "data" / "cifar10" / "cifar10-jpeg.tar.gz"
IMAGEWOOF = SHARED / "data" / "imagewoof" / "imagewoof2-160.tar"
VIT_TINY = SHARED / "weights" / "vit_tiny_patch16_224.tinyimagenet_ft.safetensors"

pytestmark = pytest.mark.slow
needs_effnet = pytest.mark.skipif(
    not (CIFAR10.is_file() and WEIGHTS.is_file()), reason=f"offline CIFAR-10 or EfficientNet weights not in {SHARED}"
)
needs_vit_tiny = pytest.mark.skipif(
    not (IMAGEWOOF.is_file() and VIT_TINY.is_file()), reason=f"offline Imagewoof or ViT-Ti weights not in {SHARED}"
)

# 2,000 training images (200 per class) for 2 epochs at 64 px, validated on a stratified 1,000 (2%) of the
# remaining training images; no augmentation, and no test pass, to keep this near a minute per method on 2 cores.
BUDGET = (
    "model=efficientnet_lite0",
    f"model.checkpoint={WEIGHTS}",
    "data=cifar10",
    f"data.archive={CIFAR10}",
    "data.image_size=64",
    "data.train_subset=2000",
    "data.val_fraction=0.02",
    "data.train_augment=false",
    "data.num_workers=0",
    "data.batch_size=64",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "optim.lr=2e-3",
    "test=false",
)


# Measured on 2 CPU cores (torch 2.14.1, timm 1.0.31, seed 42, frozen BatchNorm statistics): LoRA 0.683, linear
# probe 0.600 validation top-1 (chance 0.10); about 35 s and 10 s. The floors leave room for other BLAS builds.
FLOOR_LORA = 0.45
MARGIN = 0.02


def train(overrides: tuple[str, ...], data_dir: Path, out: Path) -> dict:
    with composed(*overrides, f"data.root={data_dir}", output_dir=out) as cfg:
        return run(cfg)


@needs_effnet
def test_lora_beats_linear_probe_on_real_cifar10(real_data_root: Path, tmp_path: Path) -> None:
    # One extraction of the archive, shared with the archive tests (conftest.py), serves both runs.
    lora = train((*BUDGET, "lora.targets=[conv1x1]", "lora.rank=8", "lora.alpha=8"), real_data_root, tmp_path / "lora")
    probe = train((*BUDGET, "lora=linear_probe"), real_data_root, tmp_path / "probe")
    assert lora["status"] == probe["status"] == "completed"
    assert lora["trainable_params"] > probe["trainable_params"]
    assert lora["best_val_acc1"] >= FLOOR_LORA, lora
    assert lora["best_val_acc1"] >= probe["best_val_acc1"] + MARGIN, (lora, probe)


# The Imagewoof study's experiment (112 px, no augmentation, validation on 451 held-out training images) cut to
# 500 training images and 2 epochs: 32 optimizer steps, no test pass.
VIT_BUDGET = (
    "+exp=imagewoof_vit_tiny",
    f"model.checkpoint={VIT_TINY}",
    f"data.archive={IMAGEWOOF}",
    "data.train_subset=500",
    "trainer.max_epochs=2",
    "test=false",
)
# Measured on 2 CPU cores (torch 2.14.1, timm 1.0.31) with these settings and seeds 42, 1, 2 (each seed also draws
# the training subset and the validation split), validation top-1: LoRA q,v r=8 at lr 3e-3 0.600, 0.549, 0.653;
# linear probe at lr 1e-3 (the study's validation choice) 0.507, 0.409, 0.504. The same-seed differences are 9.3,
# 14.0 and 14.9 points (mean 12.7, std 3.0); the margin is 2.5 of their standard deviations below their mean.
VIT_MARGIN = 0.05


@needs_vit_tiny
def test_vit_tiny_lora_beats_linear_probe_on_real_imagewoof(real_data_root: Path, tmp_path: Path) -> None:
    lora = train(VIT_BUDGET, real_data_root, tmp_path / "lora")
    probe = train((*VIT_BUDGET, "lora=linear_probe", "optim.lr=1e-3"), real_data_root, tmp_path / "probe")
    assert lora["status"] == probe["status"] == "completed"
    assert (lora["steps"], lora["trainable_params"], probe["trainable_params"]) == (32, 75_658, 1_930)
    assert lora["best_val_acc1"] >= probe["best_val_acc1"] + VIT_MARGIN, (lora, probe)
