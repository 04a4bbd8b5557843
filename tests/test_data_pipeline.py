"""The batched input pipeline (resize_on_device), the worker-count option and the data-pipeline benchmark."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2.functional import to_pil_image

from lora_vision.bench import data as bench_data
from lora_vision.builders import build_datamodule
from lora_vision.data import (
    CIFAR10_CLASSES,
    BatchTransform,
    CIFAR10DataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    build_transform,
)
from lora_vision.data.base import MAX_AUTO_WORKERS, resolve_num_workers
from lora_vision.evaluate import evaluate_model
from tests.helpers import composed

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
CONFIG = {"input_size": (3, 48, 48), "interpolation": "bicubic", **IMAGENET, "crop_pct": 1.0, "crop_mode": "center"}
# Measured on 64 random 32 px images (bicubic and bilinear; 16, 64 and 224 px; crop_pct 1.0 and 0.875): at most
# 1.10 uint8 levels apart and 0.35 on average. PIL rounds to uint8 between and after its passes; the batch does not.
MAX_LEVELS, MEAN_LEVELS = 1.25, 0.4


def random_images(count: int, seed: int = 0, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, *size), generator=generator, dtype=torch.uint8)


def make_cifar_tree(root: Path, per_class: int = 2, size: tuple[int, int] = (32, 32)) -> Path:
    """CIFAR-10 class folders of random PNGs (lossless, so pixels are exact)."""
    images = iter(random_images(2 * per_class * len(CIFAR10_CLASSES), size=size))
    for split, count in (("train", per_class), ("test", per_class)):
        for name in CIFAR10_CLASSES:
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                to_pil_image(next(images)).save(root / split / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cifar_tree(tmp_path_factory.mktemp("cifar"))


def cifar(root: Path, **options) -> CIFAR10DataModule:
    defaults = {"download": False, "val_fraction": 0, "batch_size": 8, "data_config": CONFIG, "train_augment": False}
    return CIFAR10DataModule(root=root, **{**defaults, "resize_on_device": True, **options})


def in_levels(difference: torch.Tensor, std: tuple[float, ...]) -> torch.Tensor:
    """A difference of normalized images in uint8 levels of the original pixels."""
    return difference.abs() * torch.tensor(std).view(1, -1, 1, 1) * 255


# The batch step ------------------------------------------------------------------------------------------------


def test_workers_ship_uint8_at_the_source_size_and_the_batch_step_normalizes_at_the_input_size(cifar_tree):
    dm = cifar(cifar_tree)
    image, _ = dm.dataset("train")[0]
    assert (image.dtype, image.shape) == (torch.uint8, (3, 32, 32))
    images, targets = next(iter(dm.train_dataloader()))
    batch = dm.batch_transform(images)
    assert (batch.dtype, batch.shape, len(targets)) == (torch.float32, (8, 3, 48, 48), 8)
    solid = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    expected = [(200 / 255 - m) / s for m, s in zip(IMAGENET["mean"], IMAGENET["std"], strict=True)]
    torch.testing.assert_close(dm.batch_transform(solid)[:, :, 0, 0], torch.tensor([expected, expected]))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(("size", "crop_pct"), [(224, 1.0), (224, 0.875), (16, 0.9)])
def test_batched_evaluation_matches_the_pil_transform(interpolation, size, crop_pct):
    config = {**CONFIG, "input_size": (3, size, size), "interpolation": interpolation, "crop_pct": crop_pct}
    images = random_images(16)
    pil = torch.stack([build_transform(config, is_training=False)(to_pil_image(image)) for image in images])
    per_image = build_transform(config, is_training=False, source_size=(32, 32))
    uint8 = torch.stack([per_image(to_pil_image(image)) for image in images])
    batched = BatchTransform(config, (32, 32), is_training=False)(uint8)
    assert batched.shape == pil.shape
    levels = in_levels(batched - pil, config["std"])
    assert levels.max() <= MAX_LEVELS and levels.mean() <= MEAN_LEVELS


def test_training_augmentation_is_seeded_and_ends_at_the_input_size(cifar_tree):
    def first_batch(seed: int) -> torch.Tensor:
        dm = cifar(cifar_tree, train_augment=True, seed=seed, num_workers=1)
        images, _ = next(iter(dm.train_dataloader()))
        return dm.batch_transform(images, training=True)

    batch = first_batch(0)
    assert batch.shape == (8, 3, 48, 48)
    torch.testing.assert_close(batch, first_batch(0))
    assert not torch.equal(batch, first_batch(1))


def test_random_erasing_runs_on_the_normalized_batch(cifar_tree):
    dm = cifar(cifar_tree, train_augment={"re_prob": 1.0})
    images, _ = next(iter(dm.train_dataloader()))
    erased = dm.batch_transform(images, training=True)
    # 'const' erasing writes zeros, which random pixels never normalize to exactly.
    assert ((erased == 0).all(dim=1).flatten(1).sum(dim=1) > 0).all()
    assert not (dm.batch_transform(images) == 0).all(dim=1).any()


def test_the_batch_step_refuses_a_batch_it_already_transformed(cifar_tree):
    dm = cifar(cifar_tree)
    once = dm.batch_transform(random_images(2))
    with pytest.raises(ValueError, match=r"takes uint8 \(N, C, H, W\) images, got torch.float32.*applied twice"):
        dm.batch_transform(once)


def test_without_the_option_batches_pass_through(cifar_tree):
    dm = cifar(cifar_tree, resize_on_device=False)
    images, _ = next(iter(dm.val_dataloader()))
    assert images.dtype == torch.float32 and dm.batch_transform(images) is images


# Errors -------------------------------------------------------------------------------------------------------


def test_datamodules_without_a_fixed_image_size_refuse_the_option():
    for make in (ImageFolderDataModule, SyntheticDataModule):
        with pytest.raises(ValueError, match=r"resize_on_device=true needs images of one fixed size.*=false"):
            make(resize_on_device=True)
    with pytest.raises(ValueError, match="resize_on_device must be true or false, got 'yes'"):
        CIFAR10DataModule(resize_on_device="yes")


def test_an_image_of_another_size_is_named_when_loaded(tmp_path):
    dm = cifar(make_cifar_tree(tmp_path / "cifar", per_class=1, size=(24, 40)))
    with pytest.raises(ValueError, match=r"needs every image at 32x32 px .*got one of 24x40.*resize_on_device=false"):
        dm.dataset("train")[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"crop_mode": "border"}, "crop_mode 'center' .* or 'squash'.*crop_mode='border'"),
        ({"input_size": (3, 48, 64), "crop_pct": 0.9}, r"input_size \(48, 64\)"),
        ({"interpolation": "lanczos"}, r"interpolation \['bicubic', 'bilinear', 'nearest'\].*'lanczos'"),
    ],
)
def test_data_configs_the_batch_cannot_mirror_fail_when_assigned(tmp_path, change, message):
    dm = cifar(tmp_path)
    with pytest.raises(ValueError, match=f"resize_on_device=true .*{message}"):
        dm.data_config = {**CONFIG, **change}


def test_num_workers_auto_leaves_a_core_to_the_main_process():
    cores = len(os.sched_getaffinity(0))
    assert resolve_num_workers("auto") == min(MAX_AUTO_WORKERS, cores - 1)
    assert CIFAR10DataModule(num_workers="auto").num_workers == resolve_num_workers("auto")
    for bad in (-1, "many", True, 1.5):
        with pytest.raises(ValueError, match=f"num_workers must be an integer >= 0 or 'auto', got {bad!r}"):
            CIFAR10DataModule(num_workers=bad)


def test_the_cifar_configs_turn_the_option_on():
    with composed("+exp=vit_r8") as cfg:
        dm = build_datamodule(cfg.data)
    assert dm.resize_on_device and dm.num_workers == resolve_num_workers("auto")
    with composed("data=imagewoof") as cfg:
        assert not build_datamodule(cfg.data).resize_on_device


# Loops that use the batches ------------------------------------------------------------------------------------


class ShapeRecorder(nn.Module):
    """Logits from the mean red value; remembers the dtype and shape of every input."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(1, num_classes)
        self.seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append((images.dtype, tuple(images.shape[1:])))
        return self.head(images[:, :1].mean(dim=(2, 3)))


def test_evaluate_model_applies_the_batch_step(cifar_tree):
    dm = cifar(cifar_tree)
    model = ShapeRecorder(dm.num_classes)
    scores = evaluate_model(model, dm.test_dataloader(), dm.num_classes, batch_transform=dm.batch_transform)
    assert scores["images"] == 20 and set(model.seen) == {(torch.float32, (3, 48, 48))}
    # The same model scores the PIL pipeline's images alike (the two agree to about one uint8 level).
    pil = cifar(cifar_tree, resize_on_device=False)
    assert evaluate_model(model, pil.test_dataloader(), dm.num_classes)["loss"] == pytest.approx(scores["loss"], 1e-3)


class Recording(L.LightningModule):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.model = ShapeRecorder(num_classes)

    def training_step(self, batch, _):
        images, targets = batch
        return nn.functional.cross_entropy(self.model(images), targets)

    def validation_step(self, batch, _):
        self.model(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_lightning_fit_runs_the_training_and_evaluation_batch_steps(cifar_tree):
    dm = cifar(cifar_tree, train_augment=True)
    calls = []
    batch_transform = dm.batch_transform

    def recording(images, *, training=False):
        calls.append(training)
        return batch_transform(images, training=training)

    dm.batch_transform = recording
    module = Recording(dm.num_classes)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert calls == [True, True, False]
    assert set(module.model.seen) == {(torch.float32, (3, 48, 48))}


# The benchmark -------------------------------------------------------------------------------------------------


def test_the_quick_benchmark_writes_its_table(tmp_path, capsys):
    argv = ["--quick", "--threads", "1", "--experiments", "cifar10_effnet", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    assert bench_data.main(argv) == 0
    assert torch.get_num_threads() == threads
    table = (tmp_path / bench_data.OUT_FILE).read_text()
    assert "python -m lora_vision.bench.data --quick" in table and "torch threads 1" in table
    rows = [line for line in table.splitlines() if line.startswith("| cifar10_effnet")]
    assert [row.split(" | ")[3] for row in rows] == ["pil", "batched"]
    assert all(float(row.split(" | ")[6].replace(",", "")) > 0 for row in rows)
    assert "wrote" in capsys.readouterr().out


def test_generated_imagewoof_images_have_a_160_px_shorter_side(tmp_path):
    with composed("data=imagewoof", f"paths.data_dir={tmp_path}") as cfg:
        dm = build_datamodule(cfg.data)
    bench_data.write_fake_data(dm, images=20)
    files = sorted((tmp_path / "imagewoof" / "train").rglob("*.jpg"))
    assert len(files) == 20 and len(list((tmp_path / "imagewoof" / "val").rglob("*.jpg"))) == 10
    assert {min(Image.open(f).size) for f in files} == {160}
