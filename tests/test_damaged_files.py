"""Damaged files (a copy or download that stopped early, a full disk) end in one message that names the file, what
is wrong with it and what to do, with exit status 2 from the command lines, never a traceback.

The files are real ones, written as lora_vision writes them and then cut short or overwritten. Each kind of file is
also given to the command a user runs (`python -m ...` in a subprocess), whose output must be that one message.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import subprocess
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
from lora_vision.data import CIFAR10_CLASSES, CIFAR10DataModule, DatasetFormatError, extract_archive
from lora_vision.data.archive import archive_stem
from lora_vision.evaluate import main as evaluate_main
from lora_vision.export import MODEL_META, MODEL_TENSORS
from lora_vision.export import main as export_main
from lora_vision.methods import LoRA
from lora_vision.models import ModelConfigError, build_model
from lora_vision.resume import LAST_CHECKPOINT, AtomicCheckpointIO, ResumeCheckpoint, requested_checkpoint
from lora_vision.train import run
from tests.helpers import FAST, VIT_KWARGS, adapted, composed, launch, rewrite_record, tiny_vit

VIT = "vit_small_patch16_224"


def cut_short(file: Path, keep: float = 0.5) -> None:
    """Keep the first `keep` share of `file`, as a copy that stopped part-way leaves it."""
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def overwrite(file: Path) -> None:
    """Replace every byte of `file` with a random one, as a mix-up of files or a failing disk leaves it."""
    file.write_bytes(random.Random(0).randbytes(file.stat().st_size))


def overwrite_middle(file: Path) -> None:
    """Overwrite 64 bytes in the middle of `file`, leaving its size, start and end as they were."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = random.Random(0).randbytes(64)
    file.write_bytes(bytes(data))


def error_page(file: Path) -> None:
    """What a download that got an error instead of the file saves under its name."""
    file.write_text("<html><body>502 Bad Gateway</body></html>\n")


DAMAGES: dict[str, Callable[[Path], None]] = {
    "cut to half": cut_short,
    "cut to 10 bytes": lambda file: file.write_bytes(file.read_bytes()[:10]),
    "emptied": lambda file: file.write_bytes(b""),
    "overwritten": overwrite,
    "overwritten in the middle": overwrite_middle,
    "an error page": error_page,
}


def refused(done: subprocess.CompletedProcess, file: Path) -> str:
    """What a command printed on stderr, after checking that it refused `file` as a user error: exit status 2, the
    file named, no traceback."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert str(file) in done.stderr
    return done.stderr


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


@pytest.mark.parametrize("damage", ["cut to half", "overwritten"])
@pytest.mark.parametrize(("cli", "kind"), CASES)
def test_damaged_tensors_are_one_message_naming_the_file(
    cli: str, kind: str, damage: str, saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = Path(shutil.copytree(saved / kind, tmp_path / kind))
    DAMAGES[damage](source / TENSORS[kind])
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


# A record edited or damaged into valid JSON of other types: each value as loading would meet it, far from the file.
WRONG_TYPES = {
    "num_classes": ({"num_classes": "ten"}, 'num_classes is "ten", where an integer is expected'),
    "model_kwargs": ({"model_kwargs": [1]}, "model_kwargs is [1], where an object is expected"),
    "base_source": ({"base_source": "x"}, 'base_source is "x", where an object is expected'),
    "base_source.pretrained": ({"base_source": {}}, "base_source.pretrained is missing, where true or false is"),
    "data": ({"data": "x"}, 'data is "x", where an object or null is expected'),
}


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_a_record_value_of_another_type_names_the_file_and_the_key(
    case: str, saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = Path(shutil.copytree(saved / "adapter", tmp_path / "adapter"))
    entries, fragment = WRONG_TYPES[case]
    rewrite_record(source / ADAPTER_META, **entries)
    err = run_cli("export", source, tmp_path, capsys)
    assert f"error: {source / ADAPTER_META}: {fragment}" in err
    assert "copy it again from where it was made" in err


# (command, damaged file, how): each command as a user runs it, once per kind of file. Every command meets every
# file, record and damage in-process above; a process takes seconds to start.
COMMAND_CASES = [
    ("evaluate", ADAPTER_TENSORS, "cut to half"),
    ("export", ADAPTER_TENSORS, "overwritten"),
    ("analyze", ADAPTER_TENSORS, "cut to 10 bytes"),
    ("export", ADAPTER_META, "cut to half"),
]


@pytest.mark.parametrize(("cli", "name", "damage"), COMMAND_CASES)
def test_the_commands_refuse_a_damaged_adapter_file_with_one_message(
    cli: str, name: str, damage: str, saved: Path, tmp_path: Path
) -> None:
    source = Path(shutil.copytree(saved / "adapter", tmp_path / "adapter"))
    DAMAGES[damage](source / name)
    options = [option.format(tmp=tmp_path) for option in CLIS[cli][1]]
    err = refused(launch(tmp_path, str(source), *options, module=f"lora_vision.{cli}"), source / name)
    what = "is truncated or damaged (SafetensorError: " if name == ADAPTER_TENSORS else "is not a JSON file ("
    assert f"python -m lora_vision.{cli}: error: {source / name} {what}" in err
    assert "copy it again from where it was made" in err
    assert not (tmp_path / "out").exists()


# --- the base weights of a training run (model.checkpoint) ---------------------------------------------------------


# A file named legacy.pth is written in torch's format of before 1.6 (a bare pickle stream, no zip index).
LEGACY = "legacy.pth"


def write_weights(path: Path) -> Path:
    state = tiny_vit().state_dict()
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=path.name != LEGACY)
    return path


# (weights file, damage, what the message says is wrong)
CHECKPOINT_CASES = [
    ("w.safetensors", "cut to half", "(SafetensorError: Error while deserializing header: "),
    ("w.safetensors", "emptied", "(SafetensorError: Error while deserializing header: "),
    ("w.pth", "cut to half", "(the zip directory that torch.save writes at its end is missing or unreadable)"),
    ("w.pth", "overwritten in the middle", "(its part w/data/"),
    ("w.bin", "an error page", "(it is neither a torch.save file nor a safetensors file: it begins b'<html><body>502"),
    ("w.bin", "emptied", "(the file is empty)"),
    (LEGACY, "cut to half", "(RuntimeError: unexpected EOF"),
    (LEGACY, "cut to 10 bytes", "("),
]


@pytest.mark.parametrize(("name", "damage", "reason"), CHECKPOINT_CASES)
def test_a_damaged_model_checkpoint_names_the_option_and_the_fix(
    name: str, damage: str, reason: str, tmp_path: Path
) -> None:
    # build_model is what a training run builds its backbone with, before anything else is set up.
    weights = write_weights(tmp_path / name)
    build_model(VIT, num_classes=10, checkpoint=weights, kwargs=VIT_KWARGS)  # the whole file loads
    DAMAGES[damage](weights)
    with pytest.raises(ModelConfigError) as err:
        build_model(VIT, num_classes=10, checkpoint=weights, kwargs=VIT_KWARGS)
    assert f"model.checkpoint={str(weights)!r} is truncated or damaged {reason}" in str(err.value)
    assert "download or copy the weights file again" in str(err.value)


def test_training_refuses_a_damaged_model_checkpoint_before_it_sets_anything_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = write_weights(tmp_path / "w.safetensors")
    run_dir = tmp_path / "run"
    # The finished run, trained and then reported in this process; the command refusing to train it again (below)
    # is the one a user runs.
    with composed(*FAST, f"model.checkpoint={weights}", output_dir=run_dir) as cfg:
        assert run(cfg)["status"] == "completed"
    record = (run_dir / "results.json").read_bytes()
    cut_short(weights)
    # The finished run is still reported: reporting needs no weights.
    with composed(*FAST, f"model.checkpoint={weights}", output_dir=run_dir) as cfg, caplog.at_level(logging.INFO):
        assert run(cfg) == json.loads(record)
    assert "holds a finished run (status completed" in caplog.text
    # Training it again needs them: refused before the finished attempt is moved aside.
    done = launch(tmp_path, *FAST, f"model.checkpoint={weights}", f"hydra.run.dir={run_dir}", "resume=false")
    err = refused(done, weights)
    assert f"python -m lora_vision.train: error: model.checkpoint={str(weights)!r} is truncated or damaged (" in err
    assert "download or copy the weights file again" in err
    assert not list(run_dir.glob("previous-*")) and (run_dir / "results.json").read_bytes() == record


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


def test_resume_from_a_damaged_last_checkpoint_is_one_message_and_leaves_it_in_place(
    resume_checkpoint: ResumeCheckpoint, tmp_path: Path
) -> None:
    # A run killed before it wrote results.json, resumed as a requeued job resumes (resume=true is the default). The
    # file is overwritten rather than cut short (the test above): it has no zip directory at all then.
    last = tmp_path / "run" / "checkpoints" / LAST_CHECKPOINT
    last.parent.mkdir(parents=True)
    shutil.copy(resume_checkpoint.path, last)
    overwrite(last)
    damaged = last.read_bytes()
    done = launch(tmp_path, *FAST, "resume=true", f"hydra.run.dir={last.parent.parent}")
    err = refused(done, last)
    assert f"error: cannot resume from {last}: the checkpoint is truncated or damaged (it is neither a torch" in err
    assert "start fresh with resume=false (the earlier attempt is kept in previous-<n>/)" in err
    # Nothing deleted or started over: the file is as it was, and no run record was written.
    assert last.read_bytes() == damaged
    assert not (last.parent.parent / "results.json").exists()


# --- data archives -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10 ImageFolder tree of one 32 px image per class and split."""
    tree = tmp_path_factory.mktemp("cifar") / "tree"
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (tree / split / name).mkdir(parents=True)
            Image.effect_noise((32, 32), 64).convert("RGB").save(tree / split / name / "0.jpg")
    return tree


def write_archive(tree: Path, archive: Path) -> Path:
    compression = {".gz": "gz", ".bz2": "bz2", ".xz": "xz"}.get(archive.suffix, "")
    with tarfile.open(archive, f"w:{compression}") as tar:
        tar.add(tree, arcname=".")
    return archive


# (archive suffix, damage): cuts that leave part of the members or part of the first header (where tarfile's own
# is_tarfile fails), and a corrupt bz2 block.
ARCHIVE_CASES = [
    (".tar", "cut to half"),
    (".tar.gz", "cut to half"),
    (".tar.gz", "cut to 10 bytes"),
    (".tar.bz2", "overwritten in the middle"),
]


@pytest.mark.parametrize(("suffix", "damage"), ARCHIVE_CASES)
def test_a_damaged_data_archive_names_the_file_and_leaves_nothing_extracted(
    suffix: str, damage: str, cifar_tree: Path, tmp_path: Path
) -> None:
    archive = write_archive(cifar_tree, tmp_path / f"cifar10-jpeg{suffix}")
    whole = archive.read_bytes()
    DAMAGES[damage](archive)
    cache = tmp_path / "cache"
    options = {"root": tmp_path, "archive": archive, "cache_dir": cache, "download": False, "val_fraction": 0.0}
    with pytest.raises(DatasetFormatError) as err:
        CIFAR10DataModule(**options).prepare_data()
    assert str(err.value).startswith(f"{archive} is ")
    assert "truncated or corrupt" in str(err.value) and "copy" in str(err.value)
    # Nothing half-extracted is left to pass for a complete copy; the whole archive then extracts.
    assert [p.name for p in cache.glob("*")] in ([], [f"{archive_stem(archive)}.lock"])
    archive.write_bytes(whole)
    CIFAR10DataModule(**options).prepare_data()
    assert (cache / archive_stem(archive) / "test" / "truck" / "0.jpg").is_file()


def test_a_corrupt_bz2_block_past_the_first_names_the_archive(tmp_path: Path) -> None:
    # bz2 reports a corrupt block as a plain OSError, which must not pass for an error of the file system. At level 1
    # it compresses in 100 kB blocks: the first one reads (so the file passes for a tar), the middle one is corrupt.
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "noise.bin").write_bytes(random.Random(0).randbytes(400_000))
    archive = tmp_path / "noise.tar.bz2"
    with tarfile.open(archive, "w:bz2", compresslevel=1) as tar:
        tar.add(tree, arcname=".")
    overwrite_middle(archive)
    with pytest.raises(DatasetFormatError) as err:
        extract_archive(archive, tmp_path / "extracted")
    assert str(err.value).startswith(f"{archive} is truncated or corrupt: extracting it failed (OSError: Invalid data")
    assert not (tmp_path / "extracted").exists()


def test_a_full_disk_while_extracting_is_not_blamed_on_the_archive(
    cifar_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    archive = write_archive(cifar_tree, tmp_path / "cifar10-jpeg.tar")
    monkeypatch.setattr(tarfile.TarFile, "extractall", full_disk)
    with pytest.raises(OSError) as err:
        extract_archive(archive, tmp_path / "extracted")
    assert err.value.errno == errno.ENOSPC


def test_training_refuses_a_truncated_data_archive_with_one_message(cifar_tree: Path, tmp_path: Path) -> None:
    archive = write_archive(cifar_tree, tmp_path / "cifar10-jpeg.tar.gz")
    cut_short(archive)
    smoke_data = ("~data.num_classes", "~data.num_samples", "~data.num_test_samples")  # synthetic data's own keys
    data = ("data=cifar10", *smoke_data, f"data.archive={archive}", f"data.cache_dir={tmp_path / 'cache'}")
    done = launch(tmp_path, *FAST, *data, f"hydra.run.dir={tmp_path / 'run'}")
    err = refused(done, archive)
    assert f"python -m lora_vision.train: error: {archive} is truncated or corrupt: extracting it failed (" in err
    assert "copy or download it again" in err
