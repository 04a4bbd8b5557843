"""Interruption and resume: killed runs (SIGKILL, SIGTERM) resume to the metrics of an uninterrupted run; SIGTERM
saves and stops a multirun; checkpoints are atomic, trainable-only and tied to their base weights; a NaN loss
stops the run as `diverged`.

The runs are the smoke experiment (8 training steps per epoch, 2 epochs, LoRA dropout) with a resume checkpoint
every 5 steps.
A test-only callback (`tests.resume_helpers.HoldAtStep`) holds the run at a chosen step and the test signals the
process there, so the kill point is known, not guessed from sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io import torch_io
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lora_vision.callbacks import DivergedError
from lora_vision.config_checks import ConfigError
from lora_vision.report.collect import aggregate
from lora_vision.report.table import markdown
from lora_vision.resume import LAST_CHECKPOINT, AtomicCheckpointIO
from lora_vision.train import SIGTERM_EXIT_STATUS, run
from tests.helpers import composed

ROOT = Path(__file__).resolve().parents[1]
# LoRA dropout makes every training step draw from the global RNG, so an exact resume needs its state restored.
RUN = ("+exp=smoke", "lora.dropout=0.1", "callbacks.resume_checkpoint.every_n_train_steps=5")
# Everything results.json says about the training outcome.
OUTCOME = ("best_val_acc1", "test_acc1", "test_acc5", "test_loss", "epochs", "steps")
TIMEOUT_S = 180


def command(run_dir: Path, *overrides: str, multirun: bool = False) -> list[str]:
    location = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    return [sys.executable, "-m", "lora_vision.train", *(["-m"] if multirun else []), *RUN, *overrides, location]


def environment() -> dict[str, str]:
    # The subprocess imports the test-only callback from this checkout.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command(run_dir, *overrides), cwd=run_dir.parent, env=environment(), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def kill_at_step(run_dir: Path, step: int, sig: signal.Signals, *, multirun: bool = False) -> int:
    """Start a run, hold it after optimizer step `step`, send `sig` to its process; return the exit status."""
    marker = run_dir.parent / f"{run_dir.name}.held"
    hold = ("+callbacks.hold._target_=tests.resume_helpers.HoldAtStep", f"+callbacks.hold.step={step}")
    overrides = (*hold, f"+callbacks.hold.marker={marker}", *(["seed=0,1"] if multirun else []))
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    process = subprocess.Popen(
        command(run_dir, *overrides, multirun=multirun), cwd=run_dir.parent, env=environment(), stdout=log, stderr=log
    )
    try:
        while not marker.exists():
            assert process.poll() is None, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(process.pid, sig)
        return process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def outcome(run_dir: Path) -> dict:
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed", record.get("error")
    return {key: record[key] for key in OUTCOME}


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file


def train_here(run_dir: Path) -> dict:
    """The same run as `train`, in this process: the interrupted runs' processes are the ones under test."""
    with composed(*RUN, output_dir=run_dir) as cfg:
        return run(cfg)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("resume") / "reference"
    train_here(run_dir)
    return run_dir


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_to_identical_metrics(reference: Path, tmp_path: Path) -> None:
    """Killed at step 12 (epoch 1, batch 4): it resumes from the step-10 checkpoint, mid-epoch.

    Exact equality holds because the checkpoint carries weights, optimizer, schedule, loop counters, the global
    RNG states (which dropout draws from) and the training loader's position (its shuffling generator at the start
    of the epoch and the batches already trained on), and the smoke run's data pipeline draws no random numbers.
    """
    run_dir = tmp_path / "run"
    assert kill_at_step(run_dir, 12, signal.SIGKILL) == -signal.SIGKILL
    assert checkpoint(run_dir / "checkpoints" / LAST_CHECKPOINT)["global_step"] == 10
    assert not (run_dir / "results.json").exists()  # killed without a chance to write it
    done = train(run_dir)  # resume=true is the default
    assert "resuming from" in done.stderr + (run_dir / "train.log").read_text()
    assert outcome(run_dir) == outcome(reference)
    assert json.loads((run_dir / "results.json").read_text())["resumed_from"].endswith(LAST_CHECKPOINT)
    # The interrupted attempt's metrics are kept; the resumed attempt logs from the checkpoint's step on.
    assert "train/loss_step" in (run_dir / "csv" / "metrics.interrupted-1.csv").read_text()
    assert (run_dir / "csv" / "metrics.csv").is_file()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_and_resumes_to_identical_metrics(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert kill_at_step(run_dir, 6, signal.SIGTERM) == SIGTERM_EXIT_STATUS
    saved = checkpoint(run_dir / "checkpoints" / LAST_CHECKPOINT)
    assert saved["global_step"] == 6  # saved on SIGTERM, mid-epoch 0 (no periodic checkpoint at step 6)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted"
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    # Resumed in this process; the test above resumes with the command.
    assert train_here(run_dir)["resumed_from"].endswith(LAST_CHECKPOINT)
    assert outcome(run_dir) == outcome(reference)


def test_sigterm_stops_a_multirun_instead_of_starting_the_next_job(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    assert kill_at_step(sweep_dir, 3, signal.SIGTERM, multirun=True) == SIGTERM_EXIT_STATUS
    assert checkpoint(sweep_dir / "0" / "checkpoints" / LAST_CHECKPOINT)["global_step"] == 3
    assert not (sweep_dir / "1").exists()
    assert not (sweep_dir / "report.md").exists()


def test_checkpoint_holds_trainable_weights_and_the_base_fingerprint(reference: Path) -> None:
    record = json.loads((reference / "results.json").read_text())
    saved = checkpoint(reference / "checkpoints" / LAST_CHECKPOINT)
    assert saved["base_fingerprint"] == record["base_fingerprint"]
    stored = sum(t.numel() for t in saved["state_dict"].values())
    assert stored < record["total_params"] / 4
    assert not any(key.endswith(("qkv.weight", "fc1.weight", "patch_embed.proj.weight")) for key in saved["state_dict"])
    assert "lr_schedulers" in saved and "optimizer_states" in saved and "rng" in saved["callbacks"]["ResumeCheckpoint"]


def test_resuming_onto_other_base_weights_fails_clearly(reference: Path, tmp_path: Path) -> None:
    last = reference / "checkpoints" / LAST_CHECKPOINT
    # Another seed initialises the (random) base weights differently.
    with composed(*RUN, "seed=1", f"resume={last}", output_dir=tmp_path) as cfg, pytest.raises(ValueError) as err:
        run(cfg)
    assert "trained on base weights" in str(err.value) and "this run built" in str(err.value)


@pytest.mark.parametrize("value", ["maybe", "/nonexistent/last.ckpt"])
def test_invalid_resume_value_fails_before_training(value: str, tmp_path: Path) -> None:
    with composed(*RUN, f"resume={value}", output_dir=tmp_path) as cfg, pytest.raises(ConfigError) as err:
        run(cfg)
    assert f"resume={value!r} is invalid" in str(err.value)


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_a_finite_checkpoint(tmp_path: Path) -> None:
    overrides = ("+exp=smoke", "optim.lr=1e30", "callbacks.resume_checkpoint.every_n_train_steps=1")
    with composed(*overrides, output_dir=tmp_path) as cfg, pytest.raises(DivergedError) as err:
        run(cfg)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "diverged" and record["diverged_at_step"] == err.value.step > 0
    assert f"at step {err.value.step}" in str(err.value) and f"at step {err.value.step}" in record["error"]
    saved = checkpoint(tmp_path / "checkpoints" / LAST_CHECKPOINT)
    assert saved["global_step"] == err.value.step  # the weights before the diverged step
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())
    table = markdown(aggregate([record]))
    assert "| diverged |" in table and f"diverged at step {err.value.step}" in table


def fail_midway(checkpoint: dict, path: str) -> None:
    """Lightning's write, killed halfway: the first bytes reach the file, then the process dies."""
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError("killed during the write")


def test_atomic_checkpoint_io_leaves_the_previous_file_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / LAST_CHECKPOINT
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    monkeypatch.setattr(torch_io, "_atomic_save", fail_midway)
    with pytest.raises(OSError, match="killed during the write"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [LAST_CHECKPOINT]  # no temporary file left behind
    # What Lightning's own CheckpointIO leaves in the same situation: a truncated checkpoint.
    with pytest.raises(OSError):
        TorchCheckpointIO().save_checkpoint({"step": 2}, target)
    with pytest.raises(RuntimeError):  # torch: "failed finding central directory"
        torch.load(target, weights_only=True)
