"""A short real-data run: the shared EfficientNet-Lite0 (ImageNet-1k) weights on real CIFAR-10 images.

LoRA on the pointwise convolutions must beat the linear probe trained with the same budget. Uses the offline
assets beside the checkout (../shared, see their READMEs) and skips when they are absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_vision.train import run
from tests.test_config import composed

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10 = SHARED / "data" / "cifar10" / "cifar10-jpeg.tar.gz"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CIFAR10.is_file() and WEIGHTS.is_file()),
        reason=f"offline CIFAR-10 or EfficientNet weights not in {SHARED}",
    ),
]

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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One extraction of the archive serves both runs.
    return tmp_path_factory.mktemp("cifar10")


def train(method_overrides: tuple[str, ...], data_dir: Path, out: Path) -> dict:
    with composed(*BUDGET, f"data.root={data_dir}", *method_overrides, output_dir=out) as cfg:
        return run(cfg)


def test_lora_beats_linear_probe_on_real_cifar10(data_dir: Path, tmp_path: Path) -> None:
    lora = train(("lora.targets=[conv1x1]", "lora.rank=8", "lora.alpha=8"), data_dir, tmp_path / "lora")
    probe = train(("lora=linear_probe",), data_dir, tmp_path / "probe")
    assert lora["status"] == probe["status"] == "completed"
    assert lora["trainable_params"] > probe["trainable_params"]
    assert lora["best_val_acc1"] >= FLOOR_LORA, lora
    assert lora["best_val_acc1"] >= probe["best_val_acc1"] + MARGIN, (lora, probe)
