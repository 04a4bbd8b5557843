"""Damaged files (a copy or download that stopped early, a full disk) end in one message that names the file, what
is wrong with it and what to do, with exit status 2 from the command lines, never a traceback.

The files are real ones, written as lora_vision writes them and then cut short.
"""

from __future__ import annotations

import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_vision.adapters import ADAPTER_META, ADAPTER_TENSORS, PEFT_CONFIG, PEFT_TENSORS
from lora_vision.analyze.__main__ import main as analyze_main
from lora_vision.config_checks import ConfigError
from lora_vision.data import CIFAR10_CLASSES, CIFAR10DataModule, DatasetFormatError
from lora_vision.data.archive import archive_stem
from lora_vision.evaluate import main as evaluate_main
from lora_vision.export import MODEL_META, MODEL_TENSORS
from lora_vision.export import main as export_main
from lora_vision.methods import LoRA
from lora_vision.models import ModelConfigError, build_model
from lora_vision.resume import AtomicCheckpointIO, ResumeCheckpoint, requested_checkpoint
from tests.helpers import VIT_KWARGS, adapted, tiny_vit

VIT = "vit_small_patch16_224"


def cut_short(file: Path, keep: float = 0.5) -> None:
    """Keep the first `keep` share of `file`, as a copy that stopped part-way leaves it."""
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


# --- adapters and exports given to the command lines ---------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter, its merged export and its PEFT export, written once for the module; tests damage copies."""
    root = tmp_path_factory.mktemp("saved")
    adapted(tiny_vit, LoRA(rank=4, targets=["qv"]), root / "adapter", VIT, VIT_KWARGS)
    export_main([str(root / "adapter"), "--out", str(root / "merged")])
    export_main([str(root / "adapter"), "--out", str(root / "peft"), "--format", "peft"])
    return root


def cli_error(main: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """What `main(argv)` printed on stderr, after checking it ended as a user error: status 2, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


CLIS: dict[str, tuple[Callable[[list[str]], object], list[str]]] = {
    "evaluate": (evaluate_main, ["data=synthetic", "--limit-batches", "1"]),
    "export": (export_main, ["--out", "{tmp}/out"]),
    "analyze": (analyze_main, ["--no-eval"]),
}
# The merged export is only evaluated: there is no adapter left in it to export or analyse.
CASES = [(cli, kind) for kind in ("adapter", "peft") for cli in CLIS] + [("evaluate", "merged")]
TENSORS = {"adapter": ADAPTER_TENSORS, "peft": PEFT_TENSORS, "merged": MODEL_TENSORS}
RECORDS = {"adapter": ADAPTER_META, "peft": PEFT_CONFIG, "merged": MODEL_META}


def run_cli(cli: str, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    main, options = CLIS[cli]
    return cli_error(main, [str(source), *(o.format(tmp=tmp_path) for o in options)], capsys)


@pytest.mark.parametrize(("cli", "kind"), CASES)
def test_truncated_tensors_are_one_message_naming_the_file(
    cli: str, kind: str, saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = Path(shutil.copytree(saved / kind, tmp_path / kind))
    cut_short(source / TENSORS[kind])
    err = run_cli(cli, source, tmp_path, capsys)
    assert f"error: {source / TENSORS[kind]} is truncated or damaged (SafetensorError: " in err
    assert "copy it again from where it was made" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("cli", "kind"), CASES)
def test_truncated_json_records_are_one_message_naming_the_file_and_the_position(
    cli: str, kind: str, saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = Path(shutil.copytree(saved / kind, tmp_path / kind))
    cut_short(source / RECORDS[kind])
    err = run_cli(cli, source, tmp_path, capsys)
    what = "is not valid JSON" if kind == "peft" else "is not a JSON file"
    assert f"error: {source / RECORDS[kind]} {what} (" in err
    assert re.search(r"line \d+ column \d+ \(char \d+\)", err)
    assert "copy it again from where it was made" in err


# --- the base weights of a training run (model.checkpoint) ---------------------------------------------------------


def write_weights(path: Path) -> Path:
    state = tiny_vit().state_dict()
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize(("name", "keep"), [("w.safetensors", 0.5), ("w.safetensors", 0.0), ("w.pth", 0.9)])
def test_a_truncated_model_checkpoint_names_the_option_and_the_fix(name: str, keep: float, tmp_path: Path) -> None:
    # build_model is what a training run builds its backbone with, before anything else is set up.
    weights = write_weights(tmp_path / name)
    build_model(VIT, num_classes=10, checkpoint=weights, kwargs=VIT_KWARGS)  # the whole file loads
    cut_short(weights, keep)
    with pytest.raises(ModelConfigError) as err:
        build_model(VIT, num_classes=10, checkpoint=weights, kwargs=VIT_KWARGS)
    assert f"model.checkpoint={str(weights)!r} is truncated or damaged (" in str(err.value)
    assert "download or copy the weights file again" in str(err.value)


# --- resuming from a damaged checkpoint ----------------------------------------------------------------------------


class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1)


@pytest.fixture
def resume_checkpoint(tmp_path: Path) -> ResumeCheckpoint:
    """The resume callback of a run whose one epoch wrote `last.ckpt`, as training writes it."""
    callback = ResumeCheckpoint(tmp_path / "checkpoints")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyModule(), DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2))
    assert callback.path.is_file()
    return callback


def test_resuming_from_a_truncated_checkpoint_is_refused_before_training(
    resume_checkpoint: ResumeCheckpoint, tmp_path: Path
) -> None:
    last = resume_checkpoint.path
    cfg = OmegaConf.create({"resume": True, "paths": {"output_dir": str(tmp_path)}})
    assert requested_checkpoint(cfg, [resume_checkpoint]) == last
    cut_short(last, 0.9)
    with pytest.raises((RuntimeError, OSError)):
        AtomicCheckpointIO().load_checkpoint(last)  # where Lightning would fail, inside trainer.fit
    (last.parent / "epoch=0.ckpt").write_bytes(b"")
    for value in (True, str(last)):
        with pytest.raises(ConfigError) as err:
            requested_checkpoint(OmegaConf.merge(cfg, {"resume": value}), [resume_checkpoint])
        message = str(err.value)
        assert f"cannot resume from {last}: the checkpoint is truncated or damaged (" in message
        assert "resume=false (the earlier attempt is kept in previous-<n>/)" in message
        assert f"resume=PATH ({last.parent} also holds epoch=0.ckpt)" in message


# --- data archives -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_truncated_data_archive_names_the_file_and_leaves_nothing_extracted(suffix: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (tree / split / name).mkdir(parents=True)
            Image.effect_noise((32, 32), 64).convert("RGB").save(tree / split / name / "0.jpg")
    archive = tmp_path / f"cifar10-jpeg{suffix}"
    with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w") as tar:
        tar.add(tree, arcname=".")
    whole = archive.read_bytes()
    cut_short(archive)
    cache = tmp_path / "cache"
    options = {"root": tmp_path, "archive": archive, "cache_dir": cache, "download": False, "val_fraction": 0.0}
    with pytest.raises(DatasetFormatError) as err:
        CIFAR10DataModule(**options).prepare_data()
    assert f"{archive} is truncated or corrupt: extracting it failed (" in str(err.value)
    assert "copy or download it again" in str(err.value)
    # Nothing half-extracted is left to pass for a complete copy; the whole archive then extracts.
    assert [p.name for p in cache.iterdir()] == [f"{archive_stem(archive)}.lock"]
    archive.write_bytes(whole)
    CIFAR10DataModule(**options).prepare_data()
    assert (cache / archive_stem(archive) / "test" / "truck" / "0.jpg").is_file()
