"""VTAB-1k: the task table, the datamodule on a miniature of the released layout, its errors, the 19-task sweep with
a tiny model, and the report's group means checked against numbers computed by hand."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image

from lora_vision.builders import build_method
from lora_vision.data import (
    VTAB1K_TASK_NAMES,
    VTAB1K_TASKS,
    DataOptionError,
    DatasetFormatError,
    DatasetNotFoundError,
    VTab1kDataModule,
)
from lora_vision.errors import UserError
from lora_vision.report import build_report
from lora_vision.report.collect import aggregate
from lora_vision.report.vtab1k import PUBLISHED, vtab1k_markdown, vtab1k_means
from lora_vision.train import run
from tests.helpers import CONF, MINI_VTAB1K_IMAGES, composed, launch, make_vtab1k_layout, records

# Checked against NOAH's dataset code (github.com/ZhangYuanhan-AI/NOAH, lib/datasets.py).
CLASS_COUNTS = {
    "cifar": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}
SMALL_INPUT = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear"}
# A 19-task ViT-B/16 run shrunk to seconds on a CPU: the tiny ViT of +exp=smoke, one epoch, no worker processes.
TINY = (
    "model=vit_tiny",
    "model.pretrained=false",
    "+model.kwargs.depth=2",
    "+model.kwargs.embed_dim=64",
    "+model.kwargs.num_heads=2",
    "+model.kwargs.patch_size=8",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "optim.warmup_epochs=0",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.pin_memory=false",
)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The miniature layout, shared read-only by the tests of this module."""
    return make_vtab1k_layout(tmp_path_factory.mktemp("vtab") / "vtab-1k")


@pytest.fixture
def own_layout(layout: Path, tmp_path: Path) -> Path:
    """A copy of the layout that a test may break."""
    return Path(shutil.copytree(layout, tmp_path / "vtab-1k"))


def datamodule(root: Path, **options) -> VTab1kDataModule:
    return VTab1kDataModule(root=root, data_config=SMALL_INPUT, **options)


def test_the_task_table_has_the_19_tasks_in_three_groups() -> None:
    assert {task.name: task.num_classes for task in VTAB1K_TASKS} == CLASS_COUNTS
    groups = [task.group for task in VTAB1K_TASKS]
    assert groups == ["Natural"] * 7 + ["Specialized"] * 4 + ["Structured"] * 8


def test_the_sweep_runs_every_task_in_table_order() -> None:
    params = OmegaConf.load(CONF / "sweep" / "vtab1k.yaml").hydra.sweeper.params
    assert tuple(params["data.task"].split(",")) == VTAB1K_TASK_NAMES


@pytest.mark.parametrize(
    ("exp", "targets", "dropout", "drop_path"),
    [("vtab1k_vit_b16_lora_qv", ["qv"], 0.0, None), ("vtab1k_vit_b16_lora_noah", ["qkv_fused"], 0.1, 0.1)],
)
def test_the_experiments_hold_the_protocol_and_the_published_adapter_size(
    exp: str, targets: list[str], dropout: float, drop_path: float | None
) -> None:
    with composed(f"+exp={exp}") as cfg:
        settings = OmegaConf.to_container(cfg, resolve=True)
        method = build_method(cfg.lora)
    data, optim, lora = settings["data"], settings["optim"], settings["lora"]
    assert data["_target_"].endswith("VTab1kDataModule") and data["protocol"] == "final"
    assert (data["image_size"], data["batch_size"], data["crop_mode"]) == (224, 64, "squash")
    assert data["train_augment"] is False
    assert (optim["lr"], optim["weight_decay"], optim["warmup_epochs"]) == (5e-3, 1e-4, 10)
    assert settings["trainer"]["max_epochs"] == 100 and settings["objective"]["select"] == "last"
    assert (lora["rank"], lora["alpha"], lora["targets"], lora["dropout"]) == (8, 8.0, targets, dropout)
    assert settings["model"]["kwargs"].get("drop_path_rate") == drop_path
    with torch.device("meta"):  # shapes only: the count needs no weights
        model = timm.create_model(settings["model"]["name"], num_classes=100, **settings["model"]["kwargs"])
    assert method.apply(model).adapter_params == 294_912  # NOAH's "0.29 M"


def test_the_class_count_is_known_without_reading_any_file(tmp_path: Path) -> None:
    for name, count in CLASS_COUNTS.items():
        data = VTab1kDataModule(root=tmp_path / "absent", task=name)
        assert data.num_classes == count and data.class_names[-1] == str(count - 1)
    assert list(tmp_path.iterdir()) == []


def test_every_task_of_the_layout_loads(layout: Path) -> None:
    for name in VTAB1K_TASK_NAMES:
        data = datamodule(layout, task=name)
        data.prepare_data()
        train = data.dataset("train")
        image, label = train[0]
        assert image.shape == (3, 32, 32) and label == 0
        assert train.targets == [0, 1, 0, 1, 0, 1]
        assert len(data.dataset("val")) == MINI_VTAB1K_IMAGES["val200"]
        assert len(data.dataset("test")) == MINI_VTAB1K_IMAGES["test"]


def test_the_final_protocol_trains_on_train800val200_and_tests_on_test(layout: Path) -> None:
    data = datamodule(layout, task="dtd")
    sizes = {split: len(data.dataset(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 2, "test": 4}
    assert data.dataset("test").dataset.list_file == layout / "dtd" / "test.txt"


def test_the_tune_protocol_never_reads_the_test_list(own_layout: Path) -> None:
    (own_layout / "dtd" / "test.txt").unlink()
    data = datamodule(own_layout, task="dtd", protocol="tune")
    data.prepare_data()
    sizes = {split: len(data.dataset(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 4, "val": 2, "test": 2}
    assert data.dataset("test").dataset.list_file == own_layout / "dtd" / "val200.txt"


def test_whole_images_are_squashed_to_the_input_size(tmp_path: Path) -> None:
    # A wide image whose left sixth is white: resizing it whole keeps that strip, a center crop cuts it away.
    pixels = torch.zeros(12, 72, 3, dtype=torch.uint8)
    pixels[:, :12] = 255
    image = Image.fromarray(pixels.numpy())
    left_column = {}
    for mode in ("squash", "center"):
        transform = datamodule(tmp_path, crop_mode=mode).build_transform(is_training=False)
        tensor = transform(image)
        assert tensor.shape == (3, 32, 32)
        left_column[mode] = tensor[:, :, 0].mean().item()
    assert left_column["squash"] > 1.5 > left_column["center"]


def test_an_archive_of_the_layout_is_extracted_and_stepped_into(layout: Path, tmp_path: Path) -> None:
    archive = tmp_path / "vtab-1k.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname="vtab-1k")
    data = datamodule(tmp_path / "data", archive=archive, task="kitti")
    data.prepare_data()
    assert len(data.dataset("train")) == 6
    assert (tmp_path / "data" / "extracted" / "vtab-1k" / "vtab-1k" / "kitti" / "test.txt").is_file()


def test_unreadable_images_can_be_skipped_and_are_counted(own_layout: Path) -> None:
    (own_layout / "eurosat" / "images" / "train800" / "000001.jpg").write_bytes(b"not a jpeg")
    data = datamodule(own_layout, task="eurosat", skip_bad_images=True)
    assert len(data.dataset("train")) == 5
    assert data.skipped_images == 1


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        ({"task": "cifar100"}, ["task='cifar100'", "did you mean cifar", "smallnorb_ele", "data.task"]),
        ({"task": "imagenet"}, ["task='imagenet'", "valid tasks", "oxford_iiit_pet"]),
        ({"protocol": "test"}, ["protocol='test'", "final, tune", "data.protocol"]),
        ({"crop_mode": "fill"}, ["crop_mode='fill'", "squash, center, border"]),
        ({"val_fraction": 0.1}, ["val_fraction=0.1", "val200.txt", "data.val_fraction=0"]),
    ],
)
def test_a_bad_option_names_it_and_the_valid_values(tmp_path: Path, options: dict, fragments: list[str]) -> None:
    with pytest.raises(DataOptionError) as err:
        datamodule(tmp_path, **options)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_a_missing_task_folder_names_the_path_and_the_layout(own_layout: Path) -> None:
    shutil.rmtree(own_layout / "svhn")
    with pytest.raises(DatasetNotFoundError) as err:
        datamodule(own_layout, task="svhn").prepare_data()
    message = str(err.value)
    for fragment in (str(own_layout / "svhn"), "18 of the 19", "train800val200.txt", "images/", "data.root="):
        assert fragment in message


def test_a_missing_list_file_names_it(own_layout: Path) -> None:
    (own_layout / "dmlab" / "test.txt").unlink()
    data = datamodule(own_layout, task="dmlab")
    with pytest.raises(DatasetNotFoundError, match=r"dmlab/test\.txt not found.*train800\.txt, val200\.txt"):
        data.prepare_data()


def append_line(list_file: Path, line: str) -> int:
    """Add `line` to the list; its line number."""
    lines = [*list_file.read_text().splitlines(), line]
    list_file.write_text("\n".join(lines) + "\n")
    return len(lines)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("images/train800/000000.jpg", "expected '<image path relative to the list file's folder> <integer label>'"),
        ("images/train800/000000.jpg one", "got 'images/train800/000000.jpg one'"),
        ("images/train800/000000.jpg 4", "label 4 is outside 0..3 (4 classes)"),
    ],
)
def test_a_bad_list_line_names_the_file_and_the_line(own_layout: Path, line: str, fragment: str) -> None:
    list_file = own_layout / "kitti" / "train800val200.txt"
    number = append_line(list_file, line)
    with pytest.raises(DatasetFormatError) as err:
        datamodule(own_layout, task="kitti").prepare_data()
    assert f"{list_file}, line {number}: " in str(err.value) and fragment in str(err.value)


def test_an_empty_list_names_the_file(own_layout: Path) -> None:
    (own_layout / "kitti" / "val200.txt").write_text("\n")
    with pytest.raises(DatasetFormatError, match=r"kitti/val200\.txt lists no images"):
        datamodule(own_layout, task="kitti").prepare_data()


def test_a_listed_image_that_is_missing_is_named_with_its_line(own_layout: Path) -> None:
    list_file = own_layout / "resisc45" / "test.txt"
    number = append_line(list_file, "images/test/000099.jpg 1")
    with pytest.raises(DatasetNotFoundError) as err:
        datamodule(own_layout, task="resisc45").prepare_data()
    assert f"names 1 image(s) that do not exist (line {number}: " in str(err.value)
    assert str(own_layout / "resisc45" / "images" / "test" / "000099.jpg") in str(err.value)


def test_a_training_run_stops_before_training_with_one_message(own_layout: Path, tmp_path: Path) -> None:
    (own_layout / "cifar" / "test.txt").unlink()
    run_dir = tmp_path / "run"
    # A UserError: the command line prints it as one message (tests/test_train.py shows how).
    refused = pytest.raises(UserError, match=r"VTAB-1k list file .*cifar/test\.txt not found")
    with composed("+exp=vtab1k_vit_b16_lora_qv", f"data.root={own_layout}", *TINY, output_dir=run_dir) as cfg, refused:
        run(cfg)
    assert not (run_dir / "checkpoints").exists()  # no epoch was trained


@pytest.fixture(scope="module")
def sweep(layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """+sweep=vtab1k over the 19 tasks of the miniature layout with a tiny ViT."""
    sweep_dir = tmp_path_factory.mktemp("vtab_sweep") / "multirun"
    done = launch(
        sweep_dir.parent,
        "-m",
        "+exp=vtab1k_vit_b16_lora_qv",
        "+sweep=vtab1k",
        f"data.root={layout}",
        *TINY,
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep_dir


@pytest.mark.slow
def test_the_sweep_runs_all_19_tasks_with_their_class_counts(sweep: Path) -> None:
    found = sorted(records(sweep).values(), key=lambda r: VTAB1K_TASK_NAMES.index(r["task"]))
    assert [r["task"] for r in found] == list(VTAB1K_TASK_NAMES)
    assert {r["status"] for r in found} == {"completed"}
    assert {r["protocol"] for r in found} == {"final"}
    assert [r["num_classes"] for r in found] == [CLASS_COUNTS[r["task"]] for r in found]
    # The final protocol tests the last epoch, selected by nothing on val200, and keeps no best-epoch checkpoint.
    assert all(r["tested"] and r["best_checkpoint"] is None for r in found)
    assert all(r["objective_select"] == "last" and r["objective_epoch"] == r["max_epochs"] - 1 for r in found)


def test_the_sweep_report_has_the_vtab1k_table_with_its_means(sweep: Path) -> None:
    report = (sweep / "report.md").read_text()
    assert "## VTAB-1k" in report
    (ours,) = [line for line in report.splitlines() if line.startswith("| LoRA qv, r=8 |")]
    cells = [cell.strip() for cell in ours.strip("|").split("|")]
    found = records(sweep).values()
    means = vtab1k_means({r["task"]: 100 * r["test_acc1"] for r in found})
    expected = [f"{means.groups[group]:.2f}" for group in ("Natural", "Specialized", "Structured")]
    assert [cells[8], cells[13], cells[22]] == expected
    assert cells[23:] == [f"{means.tasks:.2f}", f"{means.of_groups:.2f}", "19/19 tasks"]
    assert "| mean of 19 tasks | mean of group means |" in report


# Fixed per-task results, chosen so the means are easy to check by hand.
NATURAL = dict(zip(VTAB1K_TASK_NAMES[:7], (70.0, 80.0, 90.0, 60.0, 50.0, 40.0, 100.0), strict=True))  # sum 490
SPECIALIZED = dict(zip(VTAB1K_TASK_NAMES[7:11], (80.0, 90.0, 70.0, 60.0), strict=True))  # sum 300
STRUCTURED = dict(zip(VTAB1K_TASK_NAMES[11:], (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0), strict=True))  # 360


def test_group_means_by_hand() -> None:
    means = vtab1k_means(NATURAL | SPECIALIZED | STRUCTURED)
    assert means.groups == pytest.approx({"Natural": 70.0, "Specialized": 75.0, "Structured": 45.0})
    assert means.tasks == pytest.approx(1150 / 19)  # (490 + 300 + 360) / 19 = 60.53
    assert means.of_groups == pytest.approx(190 / 3)  # (70 + 75 + 45) / 3 = 63.33


def test_a_missing_task_leaves_its_group_and_both_overall_means_empty() -> None:
    means = vtab1k_means(NATURAL | SPECIALIZED | dict(list(STRUCTURED.items())[1:]))
    assert means.groups == {"Natural": pytest.approx(70.0), "Specialized": pytest.approx(75.0), "Structured": None}
    assert means.tasks is None and means.of_groups is None
    with pytest.raises(ValueError, match="not VTAB-1k tasks: \\['cifar100'\\]"):
        vtab1k_means({"cifar100": 1.0})


def test_the_published_lora_row_gives_the_means_its_sources_print() -> None:
    (lora,) = [row for row in PUBLISHED if row.label.startswith("LoRA")]
    means = vtab1k_means(lora.accuracy)
    # By hand: Natural 556.4 / 7, Specialized 338.2 / 4, Structured 478.2 / 8.
    assert means.groups == pytest.approx({"Natural": 79.4857, "Specialized": 84.55, "Structured": 59.775}, abs=1e-4)
    assert round(means.tasks, 2) == 72.25  # V-PETL Bench's "Mean"
    assert round(means.of_groups, 2) == 74.60  # NOAH's "Average" convention; it prints 74.5
    for row in PUBLISHED:
        assert set(row.accuracy) <= set(VTAB1K_TASK_NAMES) and row.source


def vtab_record(task: str, method: str, acc: float | None, seed: int = 0, **extra) -> dict:
    rank = 8 if method == "lora" else None
    return {
        "experiment": "vtab",
        "model": "vit",
        "data": "VTab1kDataModule",
        "task": task,
        "protocol": "final",
        "image_size": 224,
        "method": method,
        "targets": ["qv"] if rank else None,
        "rank": rank,
        "lr": 0.005,
        "seed": seed,
        "trainable_params": 1000,
        "test_acc1": acc,
        "status": "completed" if acc is not None else "failed",
        **extra,
    }


def test_the_section_averages_seeds_and_leaves_incomplete_means_empty(tmp_path: Path) -> None:
    scores = NATURAL | SPECIALIZED | STRUCTURED
    runs = [vtab_record(task, "lora", (score - 1) / 100) for task, score in scores.items()]
    runs += [vtab_record(task, "lora", (score + 1) / 100, seed=1) for task, score in scores.items()]
    runs += [vtab_record(task, "linear_probe", 0.5) for task in VTAB1K_TASK_NAMES[:12]]
    runs += [vtab_record("dmlab", "linear_probe", None, error="RuntimeError: boom")]
    runs += [vtab_record("cifar", "lora", 0.9, protocol="tune")]
    runs += [vtab_record("cifar", "lora", 0.8, lr=0.001)]
    lines = vtab1k_markdown(aggregate(runs)).splitlines()
    (lora,) = [line for line in lines if line.startswith("| LoRA qv, r=8 (lr 0.005) |")]
    cells = [cell.strip() for cell in lora.strip("|").split("|")]
    assert cells[1:4] == ["70.0", "80.0", "90.0"]  # the mean of the two seeds, 1 below and 1 above
    assert [cells[8], cells[13], cells[22]] == ["70.00", "75.00", "45.00"]
    assert cells[23:] == ["60.53", "63.33", "19/19 tasks"]
    (probe,) = [line for line in lines if line.startswith("| linear probe (lr 0.005) |")]
    cells = [cell.strip() for cell in probe.strip("|").split("|")]
    assert cells[8] == "50.00" and cells[13] == "50.00"  # Natural and Specialized are complete
    assert cells[14] == "50.0" and cells[16] == "failed" and cells[22:] == ["", "", "", "12/19 tasks"]
    (tune,) = [line for line in lines if "tune" in line]
    assert tune.startswith("| LoRA qv, r=8 (lr 0.005) [tune: scored on val200] | 90.0 |")
    assert any(line.startswith("| LoRA qv, r=8 (lr 0.001) | 80.0 |") for line in lines)
    assert sum(line.startswith("| published: ") for line in lines) == len(PUBLISHED)


def test_reports_of_other_data_have_no_vtab1k_section(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    other = {**vtab_record("cifar", "lora", 0.5), "data": "CIFAR100DataModule", "task": None, "protocol": None}
    (tmp_path / "run" / "results.json").write_text(json.dumps(other))
    report = build_report([tmp_path], tmp_path)
    assert "VTAB-1k" not in report.markdown.read_text()
