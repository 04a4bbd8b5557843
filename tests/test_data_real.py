"""Optional checks on the real offline archives next to the repository (skipped when absent)."""

from collections import Counter

import pytest

from lora_vision.data import CIFAR10_CLASSES, IMAGEWOOF, CIFAR10DataModule, ImageNetSubsetDataModule
from tests.helpers import SHARED

SHARED_DATA = SHARED / "data"
CIFAR10_TAR = SHARED_DATA / "cifar10" / "cifar10-jpeg.tar.gz"
IMAGEWOOF_TAR = SHARED_DATA / "imagewoof" / "imagewoof2-160.tar"

pytestmark = pytest.mark.slow


def require(path):
    if not path.is_file():
        pytest.skip(f"real-data archive {path} is not available on this machine")
    return path


@pytest.fixture
def cache_dir(real_data_root):
    # Extracted once for the session, and shared with the real-data training runs (conftest.py).
    return real_data_root


def test_cifar10_archive_gives_the_standard_splits_and_classes(cache_dir):
    dm = CIFAR10DataModule(root=cache_dir, archive=require(CIFAR10_TAR), val_fraction=0, download=False)
    assert dm.class_names == list(CIFAR10_CLASSES)
    dm.prepare_data()
    dm.setup("fit")
    train, test = dm.dataset("train"), dm.dataset("val")
    assert (len(train), len(test)) == (50000, 10000)
    assert Counter(train.targets) == dict.fromkeys(range(10), 5000)
    assert Counter(test.targets) == dict.fromkeys(range(10), 1000)
    assert train.dataset.classes == list(CIFAR10_CLASSES)


def test_imagewoof_archive_through_the_imagewoof_preset(cache_dir):
    dm = ImageNetSubsetDataModule(root=cache_dir, archive=require(IMAGEWOOF_TAR), preset="imagewoof", val_fraction=0)
    assert dm.num_classes == 10 and dm.wnids == list(IMAGEWOOF)
    dm.setup("fit")
    dm.setup("test")
    train, test = dm.dataset("train"), dm.dataset("test")
    assert (len(train), len(test)) == (9025, 3929)
    assert [Counter(train.targets)[k] for k in range(10)] == [941, 942, 932, 580, 949, 943, 949, 928, 921, 940]
    image, target = test[0]
    assert image.shape == (3, 224, 224) and target == 0
