"""The bad-input matrix: every kind of bad config, data, missing file and resource fails early and says what is wrong.

Each case asserts the error type and that the message names the offending key or file; the config cases also
assert that nothing was written (no checkpoints, no logs), so the run stopped before training.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import pkgutil
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub
import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from PIL import Image

import lora_vision
from lora_vision.config_checks import ConfigError
from lora_vision.data import CIFAR10DataModule, DatasetFormatError, DatasetNotFoundError, ImageFolderDataModule
from lora_vision.data.images import BadImageError
from lora_vision.errors import UserError
from lora_vision.lora import LoRAConfigError
from lora_vision.models import ModelConfigError, PretrainedWeightsUnavailable, build_model, route_hub_logs_to_root
from lora_vision.preflight import OutputDirError, check_output_dir
from lora_vision.results import write_json_atomic
from lora_vision.train import run
from tests.helpers import composed

# (override on top of +exp=smoke, error type, fragments the message must contain)
CONFIG_CASES = {
    "unknown key": ("optim.learning_rate=0.1", ConfigCompositionException, ["optim.learning_rate"]),
    "unknown dataset": ("data=cifar1000", MissingConfigException, ["data/cifar1000", "cifar100", "synthetic"]),
    "data keys of the experiment's dataset": (
        "data=cifar10",
        ConfigError,
        ["data=cifar10 has no keys num_classes", "+exp=smoke", "~data.num_classes", "data=synthetic"],
    ),
    "wrong type: rank": ("lora.rank=abc", LoRAConfigError, ["lora.rank", "'abc'", "integer >= 1"]),
    "wrong type: batch size": ("data.batch_size=2.5", ConfigError, ["data.batch_size=2.5", "an integer > 0"]),
    "wrong type: lr": ("optim.lr=fast", ConfigError, ["optim.lr='fast'", "a number > 0"]),
    "rank out of range": ("lora.rank=0", LoRAConfigError, ["lora.rank", "got 0", "integer >= 1"]),
    "alpha out of range": ("lora.alpha=-1", LoRAConfigError, ["lora.alpha", "got -1", "> 0"]),
    "dropout out of range": ("lora.dropout=1.5", LoRAConfigError, ["lora.dropout", "got 1.5", "[0, 1)"]),
    "unknown timm model": ("model.name=vit_tiny_patch16_22", ModelConfigError, ["model.name", "vit_tiny_patch16_224"]),
    "targets match nothing": (
        "lora.targets=[nothing_matches_this]",
        LoRAConfigError,
        ["lora.targets", "nothing_matches_this", "presets: qv"],
    ),
    "image size vs patch size": ("data.image_size=36", ModelConfigError, ["data.image_size=36", "patch size 8", "40"]),
    "num_classes vs data": ("model.num_classes=7", ConfigError, ["model.num_classes=7", "4 classes", "null"]),
    "batch size < 1": ("data.batch_size=0", ConfigError, ["data.batch_size=0", "an integer > 0"]),
    "missing checkpoint": ("model.checkpoint=missing.safetensors", ModelConfigError, ["model.checkpoint", "missing"]),
}


def assert_names(err: pytest.ExceptionInfo, fragments: list[str]) -> None:
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in {err.value}"


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_fails_before_training(case: str, tmp_path: Path) -> None:
    override, error, fragments = CONFIG_CASES[case]
    with pytest.raises(error) as err, composed("+exp=smoke", override, output_dir=tmp_path) as cfg:
        run(cfg)
    assert_names(err, fragments)
    assert list(tmp_path.iterdir()) == []  # no checkpoints, logs or results: nothing started


def test_pretrained_weights_offline_name_the_source_and_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No network and an empty hub cache, whatever the machine has.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    output = tmp_path / "run"
    with (
        pytest.raises(PretrainedWeightsUnavailable) as err,
        composed("+exp=smoke", "model.pretrained=true", output_dir=output) as cfg,
    ):
        run(cfg)
    assert_names(err, ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "model.checkpoint=", "model.pretrained=false"])
    # The run directory was checked for writability first; nothing was written into it.
    assert list(output.iterdir()) == []


# --- data ---------------------------------------------------------------------------------------------------------

CONFIG = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 1.0}
FAST = {"data_config": CONFIG, "batch_size": 4, "train_augment": False, "val_fraction": 0.0}


def make_tree(root: Path, per_class: int = 4, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 10), color=(40 + 60 * label, 100, 200)).save(folder / f"{i}.png")
    return root


def truncated(path: Path) -> None:
    Image.new("RGB", (64, 64), color=(1, 2, 3)).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:200])


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def not_an_image(path: Path) -> None:
    path.write_text("<html>a saved web page, not a JPEG</html>")


BAD_FILES: dict[str, Callable[[Path], None]] = {
    "truncated image": truncated,
    "zero-byte file": zero_bytes,
    "non-image file with an image extension": not_an_image,
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_unreadable_image_names_the_file_and_the_option(kind: str, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "images")
    bad = root / "train" / "dog" / "bad.jpg"
    BAD_FILES[kind](bad)
    dm = ImageFolderDataModule(root=root, **FAST)
    with pytest.raises(BadImageError) as err:
        list(dm.train_dataloader())
    assert_names(err, [str(bad), "data.skip_bad_images=true"])
    assert dm.skipped_images is None


def test_unreadable_image_in_a_worker_still_names_the_file(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "images")
    bad = root / "train" / "cat" / "bad.png"
    zero_bytes(bad)
    dm = ImageFolderDataModule(root=root, **FAST, num_workers=1)
    # DataLoader re-raises a worker's exception in the main process with the same type and its message.
    with pytest.raises(BadImageError) as err:
        list(dm.train_dataloader())
    assert_names(err, [str(bad)])


def test_opting_in_skips_unreadable_images_and_counts_them(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "images")
    for i, make in enumerate(BAD_FILES.values()):
        make(root / "train" / "dog" / f"bad{i}.jpg")
    zero_bytes(root / "test" / "cat" / "bad.png")
    dm = ImageFolderDataModule(root=root, **{**FAST, "val_fraction": 0.25}, skip_bad_images=True)
    assert dm.skipped_images == 0
    dm.setup()
    assert dm.skipped_images == 4
    sizes = [len(labels) for _, labels in dm.train_dataloader()]
    assert sum(sizes) == len(dm.dataset("train")) == 6  # 8 good training images less the 2 held out
    assert sum(len(labels) for _, labels in dm.test_dataloader()) == 8
    dm.data_config = CONFIG  # a new data config reloads the splits; the count stays per folder
    dm.setup()
    assert dm.skipped_images == 4


def test_skipping_in_a_training_run(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "images", per_class=8)
    truncated(root / "train" / "dog" / "bad.jpg")
    tiny_vit = ["+model.kwargs.depth=1", "+model.kwargs.embed_dim=32", "+model.kwargs.num_heads=2"]
    data = [f"data.root={root}", "data.image_size=16", "data.batch_size=8", "data.num_workers=0"]
    overrides = ["model=vit_tiny", "model.pretrained=false", *tiny_vit, "trainer=cpu", "trainer.max_epochs=1"]
    overrides += ["optim.warmup_epochs=0", "data=image_folder", *data, "data.skip_bad_images=true"]
    with composed(*overrides, output_dir=tmp_path / "run") as cfg:
        record = run(cfg)
    assert record["status"] == "completed"
    assert record.get("skipped_images", 1) == 1  # recorded once train.py writes the datamodule's count


def test_empty_class_folder_names_the_folder(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "images")
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetFormatError) as err:
        ImageFolderDataModule(root=root, **FAST).setup("fit")
    assert_names(err, [str(root / "train"), "no valid file for the classes empty"])


def test_missing_split_names_the_path_and_the_options(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "images")
    shutil.rmtree(root / "test")
    with pytest.raises(DatasetNotFoundError) as err:
        ImageFolderDataModule(root=root, **FAST).setup("test")
    assert_names(err, [str(root / "test"), "data.root=", "data.archive="])


def test_archive_that_is_not_a_tar_names_the_file(tmp_path: Path) -> None:
    bogus = tmp_path / "images.tar.gz"
    bogus.write_bytes(b"PK\x03\x04 a zip, not a tar")
    with pytest.raises(DatasetFormatError) as err:
        ImageFolderDataModule(root=tmp_path, archive=bogus, **FAST).prepare_data()
    assert_names(err, [str(bogus), "is not a tar archive"])


def test_missing_archive_names_the_path_and_the_option(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.tar"
    with pytest.raises(DatasetNotFoundError) as err:
        ImageFolderDataModule(root=tmp_path, archive=missing, **FAST).prepare_data()
    assert_names(err, [str(missing), "data.archive"])


def test_missing_data_without_download_names_the_path_and_the_options(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        CIFAR10DataModule(root=tmp_path / "cifar", download=False, **FAST).setup("fit")
    assert_names(err, [str(tmp_path / "cifar"), "data.root=", "data.archive=", "data.download"])


def test_archive_extracted_by_two_runs_at_once_is_one_valid_tree(tmp_path: Path) -> None:
    # Two datamodules (two runs of a sweep) sharing one cache: both read the same, complete tree.
    source = make_tree(tmp_path / "source")
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname=".")
    cache = tmp_path / "cache"
    modules = [ImageFolderDataModule(root=tmp_path, archive=archive, cache_dir=cache, **FAST) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        bases = list(pool.map(lambda dm: dm.source.prepare(), modules))
    assert bases[0] == bases[1] == cache / "images"
    assert sorted(p.name for p in cache.iterdir()) == ["images", "images.lock"]  # no half-extracted leftovers
    assert [dm.num_classes for dm in modules] == [2, 2]


# --- resources ----------------------------------------------------------------------------------------------------


def test_output_dir_under_a_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the run directory should go")
    with pytest.raises(OutputDirError) as err:
        check_output_dir(blocker / "run")
    assert_names(err, ["paths.output_dir", str(blocker / "run"), "hydra.run.dir="])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the ENOSPC and file cases cover the check")
def test_read_only_output_dir_says_permission_denied(tmp_path: Path) -> None:
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        with pytest.raises(OutputDirError) as err:
            check_output_dir(read_only / "run")
    finally:
        read_only.chmod(0o755)
    assert_names(err, ["paths.output_dir", str(read_only / "run"), "Permission denied"])


def no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_fails_the_output_dir_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputDirError) as err:
        check_output_dir(tmp_path / "run")
    assert_names(err, ["paths.output_dir", str(tmp_path / "run"), "No space left on device"])
    assert list((tmp_path / "run").iterdir()) == []  # the probe file is gone


def test_writable_output_dir_passes_and_is_left_empty(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_full_disk_while_writing_results_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_json_atomic(tmp_path / "results.json", {"status": "running"})
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match=re.escape(f"cannot write {path} (No space left on device)")) as err:
        write_json_atomic(path, {"status": "completed"})
    assert err.value.errno == errno.ENOSPC
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# --- how user errors surface ----------------------------------------------------------------------------------------


def test_every_error_type_of_the_package_is_a_user_error() -> None:
    # Every exception lora_vision defines reports something the user asked for, so each must reach the one path
    # that prints a message without a traceback (lora_vision.errors); a new error type that forgets the base fails.
    defined = set()
    for module in pkgutil.walk_packages(lora_vision.__path__, "lora_vision."):
        for value in vars(importlib.import_module(module.name)).values():
            ours = isinstance(value, type) and value.__module__.startswith("lora_vision")
            if ours and issubclass(value, BaseException):
                defined.add(value)
    assert len(defined) >= 15
    assert [error.__qualname__ for error in defined if not issubclass(error, UserError)] == []


def test_unreachable_hub_fails_within_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed local port stands in for a machine without network; the hub cache is empty.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        build_model("vit_tiny_patch16_224", num_classes=3, kwargs={"img_size": 32})
    assert time.perf_counter() - started < 10  # huggingface_hub's own retries took about a minute
    assert_names(err, ["hf-hub:timm/vit_tiny_patch16_224", "model.checkpoint="])
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only for that one download


def test_hub_log_lines_print_once(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    library = logging.getLogger("huggingface_hub")
    # The library's own stream handler, as huggingface_hub installs it; restored after the test.
    monkeypatch.setattr(library, "handlers", [*library.handlers, logging.StreamHandler(sys.stderr)])
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)  # as Hydra's console handler
    hub_logger = huggingface_hub.utils.logging.get_logger("huggingface_hub.utils._http")
    try:
        hub_logger.warning("before")
        route_hub_logs_to_root()
        hub_logger.warning("after")
    finally:
        root.removeHandler(handler)
    printed = capfd.readouterr().err
    assert printed.count("before") == 2 and printed.count("after") == 1
