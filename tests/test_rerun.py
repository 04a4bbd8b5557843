"""The same command again in a run directory: a finished run keeps its files, a stale resume state finds the best
checkpoint on disk, another configuration is refused, and a fresh start keeps the earlier attempt."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from lora_vision.config_checks import ConfigError
from lora_vision.rerun import ATTEMPT_FILES, previous_record, set_aside
from lora_vision.train import run
from tests.helpers import composed

# Two epochs, so that the best epoch and its checkpoint change once during the run (epoch 1 beats epoch 0 here).
SMOKE = ("+exp=smoke",)


def files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory but the ones Hydra rewrites at each launch, by relative path."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }


def rerun(run_dir: Path, *overrides: str) -> dict:
    """The smoke command again in `run_dir`, as `python -m lora_vision.train` runs it, in this process."""
    with composed(*SMOKE, *overrides, output_dir=run_dir) as cfg:
        return run(cfg)


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("rerun") / "run"
    assert rerun(run_dir)["status"] == "completed"
    return run_dir


@pytest.fixture
def copy_of(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished run to rerun in; checkpoint paths recorded inside it still name the original."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


def test_last_checkpoint_names_the_best_checkpoint_of_its_own_epoch(finished_run: Path) -> None:
    # last.ckpt is written after the checkpoint callback saved (and deleted) that epoch's best files.
    state = torch.load(finished_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint_state = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert Path(checkpoint_state["best_model_path"]).is_file()
    assert checkpoint_state["best_model_path"] == record(finished_run)["best_checkpoint"]


def test_a_finished_run_asked_again_is_reported_and_keeps_every_file(
    copy_of: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before, first = files(copy_of), record(copy_of)
    with composed(*SMOKE, output_dir=copy_of) as cfg, caplog.at_level(logging.INFO):
        assert run(cfg) == first  # what a sweeper is told comes from the finished record
    assert "holds a finished run (status completed" in caplog.text
    assert "Restored all states" not in caplog.text  # nothing was loaded, let alone trained
    assert files(copy_of) == before


def test_rerun_test_tests_the_best_checkpoint_again_and_keeps_the_earlier_record(copy_of: Path) -> None:
    first = record(copy_of)
    assert rerun(copy_of, "rerun=test")["status"] == "completed"
    again = record(copy_of)
    assert again["status"] == "completed" and again["epochs"] == first["epochs"]
    for key in ("test_acc1", "test_loss", "best_val_acc1", "objective", "objective_epoch", "steps"):
        assert again[key] == first[key], key
    assert json.loads((copy_of / "previous-1" / "results.json").read_text()) == first


def test_a_stale_resume_state_finds_the_best_checkpoint_on_disk(finished_run: Path, copy_of: Path) -> None:
    # What earlier releases left: last.ckpt written before its epoch's best was saved names the best file of the
    # epoch before, which was deleted since, and knows no validation history. A SLURM requeue after the last
    # epoch meets it with results.json still saying `running`.
    first = record(copy_of)
    last = copy_of / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    key = next(k for k in state["callbacks"] if k.startswith("ModelCheckpoint"))
    deleted = str(copy_of / "checkpoints" / "epoch000-acc0.1000.ckpt")
    state["callbacks"][key] |= {"best_model_path": deleted, "best_k_models": {deleted: torch.tensor(0.1)}}
    del state["callbacks"]["ValidationHistory"]
    torch.save(state, last)
    (copy_of / "results.json").write_text(json.dumps(first | {"status": "running"}))

    assert rerun(copy_of)["status"] == "completed"
    again = record(copy_of)
    assert again["status"] == "completed"
    assert Path(again["best_checkpoint"]).name == Path(first["best_checkpoint"]).name
    assert again["test_acc1"] == first["test_acc1"] and again["test_loss"] == first["test_loss"]


def test_another_configuration_in_the_same_directory_is_refused(copy_of: Path) -> None:
    before = files(copy_of)
    refused = pytest.raises(ConfigError, match=re.escape("holds a run of another configuration (rank 4 there, 2 now)"))
    with composed(*SMOKE, "lora.rank=2", output_dir=copy_of) as cfg, refused:
        run(cfg)
    assert files(copy_of) == before


def test_resume_false_trains_again_and_keeps_the_earlier_attempt(copy_of: Path) -> None:
    first, before = record(copy_of), files(copy_of)
    assert rerun(copy_of, "resume=false", "trainer.max_epochs=1", "data.num_samples=64")["status"] == "completed"
    attempt = {name: data for name, data in before.items() if name.split("/")[0] in ATTEMPT_FILES}
    assert {"results.json", "adapter/adapter.safetensors", "csv/metrics.csv"} <= set(attempt)
    after = files(copy_of)
    assert {name: after.get(f"previous-1/{name}") for name in attempt} == attempt
    assert record(copy_of)["status"] == "completed" and record(copy_of)["epochs"] == 1 != first["epochs"]


def test_an_unreadable_record_is_kept_aside_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text('{"status": "compl')
    assert previous_record(tmp_path) is None
    assert (tmp_path / "results.unreadable-1.json").read_text() == '{"status": "compl'
    assert set_aside(tmp_path) is None  # nothing left to set aside
