"""Datamodules on generated image folders: contract, labels, splits, archives, errors, loaders."""

import re
import tarfile
from collections import Counter
from urllib.error import URLError

import lightning.pytorch as L
import pytest
import torch
from PIL import Image
from torch import nn

from lora_vision.data import (
    CIFAR10_CLASSES,
    CIFAR10DataModule,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageFolderDataModule,
    ImageNetSubsetDataModule,
    SyntheticDataModule,
)

CLASSES = ("cat", "dog", "frog")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CONFIG = {
    "input_size": (3, 8, 8),
    "interpolation": "bilinear",
    "mean": MEAN,
    "std": STD,
    "crop_pct": 1.0,
    "crop_mode": "center",
}
FAST = {"data_config": CONFIG, "batch_size": 4, "train_augment": False}


def red_of(label):
    """Each class gets a solid color whose red channel encodes its label, so pixels reveal labels."""
    return 40 + 60 * label


def make_tree(root, counts, classes=CLASSES):
    for split, count in counts.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 10), color=(red_of(label), 100, 200)).save(folder / f"{i:03d}.png")
    return root


def make_tar(tree, path, arcname="."):
    with tarfile.open(path, "w") as tar:
        tar.add(tree, arcname=arcname)
    return path


def labels_from_pixels(images):
    red = images[:, 0].mean(dim=(1, 2)) * STD[0] + MEAN[0]
    return ((red * 255 - 40) / 60).round().long()


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "folder", {"train": 10, "test": 3})


@pytest.fixture
def extractions(monkeypatch):
    calls = []
    original = tarfile.TarFile.extractall

    def counting_extractall(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", counting_extractall)
    return calls


def test_folder_classes_are_known_before_setup_and_labels_match_images(tree):
    dm = ImageFolderDataModule(root=tree, val_fraction=0.2, **FAST)
    assert (dm.num_classes, dm.class_names) == (3, list(CLASSES))
    dm.setup("fit")
    dm.setup("test")
    assert Counter(dm.dataset("train").targets) == {0: 8, 1: 8, 2: 8}
    assert Counter(dm.dataset("val").targets) == {0: 2, 1: 2, 2: 2}
    assert len(dm.dataset("test")) == 9
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for images, targets in loader:
            assert images.shape[1:] == (3, 8, 8)
            assert torch.equal(labels_from_pixels(images), targets)


def test_batches_are_normalized_with_the_config_mean_and_std(tree):
    config = {**CONFIG, "input_size": (3, 5, 7), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.4, 0.2)}
    dm = ImageFolderDataModule(root=tree, data_config=config, batch_size=4, train_augment=False)
    images, targets = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 5, 7)
    rgb = torch.tensor([[red_of(int(t)), 100, 200] for t in targets]) / 255
    expected = (rgb - torch.tensor(config["mean"])) / torch.tensor(config["std"])
    torch.testing.assert_close(images.mean(dim=(2, 3)), expected, atol=1e-4, rtol=0)


def test_val_split_is_seeded_disjoint_and_reproducible(tree):
    def split(seed):
        dm = ImageFolderDataModule(root=tree, seed=seed, val_fraction=0.3, **FAST)
        dm.setup("fit")
        return dm.dataset("train").indices, dm.dataset("val").indices

    train, val = split(seed=1)
    assert not set(train) & set(val)
    assert len(train) + len(val) == 30
    assert (train, val) == split(seed=1)
    assert val != split(seed=2)[1]


def test_train_subset_is_class_balanced_and_drawn_after_the_val_split(tree):
    dm = ImageFolderDataModule(root=tree, val_fraction=0.2, train_subset=7, **FAST)
    dm.setup("fit")
    full = ImageFolderDataModule(root=tree, val_fraction=0.2, **FAST)
    full.setup("fit")
    assert sorted(Counter(dm.dataset("train").targets).values()) == [2, 2, 3]
    assert dm.dataset("val").indices == full.dataset("val").indices
    assert set(dm.dataset("train").indices) <= set(full.dataset("train").indices)


def test_test_subset_is_class_balanced_and_the_same_for_every_seed(tree):
    def test_indices(**options):
        dm = ImageFolderDataModule(root=tree, test_subset=5, **FAST, **options)
        return dm.dataset("test")

    subset = test_indices(seed=1)
    assert len(subset) == 5
    assert sorted(Counter(subset.targets).values()) == [1, 2, 2]
    assert subset.indices == test_indices(seed=2).indices
    with pytest.raises(ValueError, match=re.escape("test_subset must be an integer in [1, 9] (images available)")):
        ImageFolderDataModule(root=tree, test_subset=10, **FAST).dataset("test")
    with pytest.raises(ValueError, match="test_subset must be an integer >= 1"):
        ImageFolderDataModule(root=tree, test_subset=0, **FAST)


def test_val_fraction_zero_uses_the_val_folder_else_the_test_folder(tmp_path, tree):
    dm = ImageFolderDataModule(root=tree, val_fraction=0, **FAST)
    dm.setup("fit")
    assert (len(dm.dataset("train")), len(dm.dataset("val"))) == (30, 9)
    with_val = make_tree(tmp_path / "with_val", {"train": 2, "val": 1})
    dm = ImageFolderDataModule(root=with_val, val_fraction=0, **FAST)
    assert (len(dm.dataset("val")), len(dm.dataset("test"))) == (3, 3)


def test_loaders_are_deterministic_and_pass_loader_options(tree):
    def first_epoch_targets(**options):
        dm = ImageFolderDataModule(root=tree, seed=5, val_fraction=0.2, **FAST, **options)
        return [t.tolist() for _, t in dm.train_dataloader()]

    assert first_epoch_targets() == first_epoch_targets()
    assert first_epoch_targets() == first_epoch_targets(num_workers=1, persistent_workers=True)
    dm = ImageFolderDataModule(root=tree, num_workers=0, persistent_workers=True, pin_memory=True, **FAST)
    loader = dm.val_dataloader()
    assert (loader.persistent_workers, loader.pin_memory, loader.batch_size) == (False, torch.cuda.is_available(), 4)


def test_assigning_data_config_after_setup_rebuilds_the_transforms(tree):
    dm = ImageFolderDataModule(root=tree, **FAST)
    assert next(iter(dm.val_dataloader()))[0].shape[-2:] == (8, 8)
    dm.data_config = {**CONFIG, "input_size": (3, 6, 6)}
    assert next(iter(dm.val_dataloader()))[0].shape[-2:] == (6, 6)


def test_folder_from_tar_is_extracted_once_under_the_root(tmp_path, tree, extractions):
    archive = make_tar(tree, tmp_path / "folder.tar")
    root = tmp_path / "data"
    for _ in range(2):
        dm = ImageFolderDataModule(root=root, archive=archive, **FAST)
        dm.prepare_data()
        assert dm.class_names == list(CLASSES)
        dm.setup("fit")
        assert len(dm.dataset("train")) + len(dm.dataset("val")) == 30
    assert len(extractions) == 1
    assert (root / "extracted" / "folder" / "train" / "dog").is_dir()


def test_tar_with_one_top_level_folder_is_stepped_into(tmp_path, tree):
    archive = make_tar(tree, tmp_path / "wrapped.tar.gz", arcname="imagewoof2-160")
    dm = ImageFolderDataModule(root=tmp_path / "data", archive=archive, cache_dir=tmp_path / "cache", **FAST)
    assert dm.class_names == list(CLASSES)
    assert len(dm.dataset("test")) == 9


def test_missing_root_names_the_path_and_the_options(tmp_path):
    dm = ImageFolderDataModule(root=tmp_path / "nowhere", **FAST)
    with pytest.raises(DatasetNotFoundError, match=r"nowhere/train not found.*data\.root=.*data\.archive="):
        dm.class_names  # noqa: B018 (the property is what raises)


def test_non_tar_archive_names_the_file(tmp_path):
    bogus = tmp_path / "images.tar"
    bogus.write_bytes(b"\x89PNG not a tar")
    with pytest.raises(DatasetFormatError, match=f"{re.escape(str(bogus))} is not a tar archive"):
        ImageFolderDataModule(root=tmp_path, archive=bogus, **FAST).prepare_data()


def test_class_folder_without_images_names_the_folder(tmp_path, tree):
    (tree / "train" / "empty").mkdir()
    (tree / "train" / "empty" / "notes.txt").write_text("no images here")
    dm = ImageFolderDataModule(root=tree, **FAST)
    with pytest.raises(
        DatasetFormatError, match=re.escape(f"{tree / 'train'}: Found no valid file for the classes empty")
    ):
        dm.setup("fit")


def test_split_with_other_class_folders_is_rejected(tree):
    (tree / "test" / "cat").rename(tree / "test" / "lion")
    dm = ImageFolderDataModule(root=tree, **FAST)
    with pytest.raises(DatasetFormatError, match=r"test has class folders \['dog', 'frog', 'lion'\]"):
        dm.setup("test")


def test_common_options_are_validated():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        SyntheticDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \[0, 1\), got 1.0"):
        SyntheticDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="train_subset must be an integer >= 1, got 0"):
        SyntheticDataModule(train_subset=0)


# CIFAR ---------------------------------------------------------------------------------------------


def test_cifar_reads_an_image_folder_tree_with_the_standard_classes(tmp_path):
    root = make_tree(tmp_path / "cifar", {"train": 2, "test": 1}, classes=CIFAR10_CLASSES)
    dm = CIFAR10DataModule(root=root, download=False, val_fraction=0, **FAST)
    assert dm.num_classes == 10
    dm.setup("fit")
    assert (len(dm.dataset("train")), len(dm.dataset("val"))) == (20, 10)
    assert dm.dataset("val").dataset.root == root / "test"


def test_cifar_rejects_folders_in_another_order(tmp_path):
    root = make_tree(tmp_path / "cifar", {"train": 1, "test": 1}, classes=[f"class{i}" for i in range(10)])
    with pytest.raises(DatasetFormatError, match=r"expected exactly \['airplane', 'automobile'"):
        CIFAR10DataModule(root=root, **FAST).setup("fit")


def test_cifar_missing_without_download_names_location_and_options(tmp_path):
    dm = CIFAR10DataModule(root=tmp_path / "cifar", download=False, **FAST)
    with pytest.raises(DatasetNotFoundError, match=r"not found.*cifar.*data\.root=.*data\.archive=.*data\.download"):
        dm.setup("fit")


def test_cifar_download_failure_is_wrapped(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr("torchvision.datasets.CIFAR10.download", offline)
    dm = CIFAR10DataModule(root=tmp_path / "cifar", download=True, **FAST)
    with pytest.raises(DatasetNotFoundError, match=r"could not be downloaded.*Cause: <urlopen error no network>"):
        dm.prepare_data()


# ImageNet subsets ----------------------------------------------------------------------------------

TENCH, SHIH_TZU = "n01440764", "n02086240"


@pytest.fixture
def imagenet_tree(tmp_path):
    return make_tree(tmp_path / "imagenet", {"train": 2, "val": 1}, classes=(TENCH, SHIH_TZU, "n09999999"))


def test_keep_imagenet_labels_maps_wnids_to_their_1k_indices(imagenet_tree):
    dm = ImageNetSubsetDataModule(root=imagenet_tree, classes=[SHIH_TZU, TENCH], keep_imagenet_labels=True, **FAST)
    assert dm.num_classes == 1000
    assert (dm.class_names[0], dm.class_names[155]) == ("tench", "Shih-Tzu")
    assert dm.imagenet_indices == [155, 0]
    dm.setup("test")
    test = dm.dataset("test")
    assert Counter(test.targets) == {0: 1, 155: 1}
    assert {test.dataset.samples[i][0].split("/")[-2]: t for i, t in zip(test.indices, test.targets, strict=True)} == {
        TENCH: 0,
        SHIH_TZU: 155,
    }


def test_subset_labels_follow_the_class_list_and_ignore_other_folders(imagenet_tree):
    dm = ImageNetSubsetDataModule(root=imagenet_tree, classes=[SHIH_TZU, TENCH], val_fraction=0, **FAST)
    assert (dm.num_classes, dm.class_names, dm.wnids) == (2, ["Shih-Tzu", "tench"], [SHIH_TZU, TENCH])
    dm.setup("fit")
    assert len(dm.dataset("train")) == 4
    for images, targets in dm.train_dataloader():
        assert torch.equal(labels_from_pixels(images), 1 - targets)


def test_imagewoof_preset_from_a_tar(tmp_path):
    from lora_vision.data import IMAGEWOOF

    tree = make_tree(tmp_path / "woof", {"train": 1, "val": 1}, classes=IMAGEWOOF)
    dm = ImageNetSubsetDataModule(
        root=tmp_path / "data", archive=make_tar(tree, tmp_path / "woof.tar"), preset="imagewoof"
    )
    assert (dm.num_classes, dm.class_names[0]) == (10, "Shih-Tzu")
    dm.setup("test")
    assert sorted(dm.dataset("test").targets) == list(range(10))


def test_missing_class_folder_or_split_names_the_path(imagenet_tree):
    dm = ImageNetSubsetDataModule(root=imagenet_tree, preset="imagenette", **FAST)
    with pytest.raises(
        DatasetNotFoundError,
        match=re.escape(f"9 class folder(s) missing under {imagenet_tree / 'train'}: ") + ".*n02102040",
    ):
        dm.setup("fit")
    (imagenet_tree / "val").rename(imagenet_tree / "validation")
    dm = ImageNetSubsetDataModule(root=imagenet_tree, classes=[TENCH], **FAST)
    with pytest.raises(DatasetNotFoundError, match=re.escape(f"test split folder {imagenet_tree / 'val'} not found")):
        dm.setup("test")


def test_class_list_errors_name_the_valid_choices():
    with pytest.raises(
        ValueError, match=r"unknown ImageNet subset preset 'imagenet10'; valid presets: \['imagenet100'"
    ):
        ImageNetSubsetDataModule(preset="imagenet10")
    with pytest.raises(ValueError, match="exactly one of preset"):
        ImageNetSubsetDataModule()
    with pytest.raises(ValueError, match="'n00000000' is not an ImageNet-1k wnid"):
        ImageNetSubsetDataModule(classes=["n00000000"])


# Synthetic -----------------------------------------------------------------------------------------


def test_synthetic_follows_input_size_and_is_reproducible():
    def batch(**options):
        dm = SyntheticDataModule(num_classes=3, num_samples=30, num_test_samples=12, batch_size=5, **options)
        return next(iter(dm.train_dataloader()))

    assert batch(data_config={**CONFIG, "input_size": (1, 6, 4)})[0].shape == (5, 1, 6, 4)
    assert batch(image_size=9)[0].shape == (5, 3, 9, 9)
    torch.testing.assert_close(batch(), batch())
    assert not torch.equal(batch()[0], batch(seed=1)[0])


class _LinearClassifier(L.LightningModule):
    def __init__(self, num_features, num_classes):
        super().__init__()
        self.head = nn.Linear(num_features, num_classes)

    def training_step(self, batch, _):
        images, targets = batch
        return nn.functional.cross_entropy(self.head(images.flatten(1)), targets)

    def validation_step(self, batch, _):
        images, targets = batch
        self.log("acc", (self.head(images.flatten(1)).argmax(1) == targets).float().mean())

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_synthetic_is_learnable_through_a_lightning_trainer():
    dm = SyntheticDataModule(num_classes=4, num_samples=256, num_test_samples=128, image_size=8, batch_size=32)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = _LinearClassifier(3 * 8 * 8, dm.num_classes)
    trainer.fit(model, datamodule=dm)
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["acc"] > 0.6
