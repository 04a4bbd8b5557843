"""The training entry point end to end: `python -m lora_vision.train +exp=smoke`, reruns and early failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from lora_vision.cli import checked_command_line
from lora_vision.config_checks import ConfigError, check_appended_keys
from lora_vision.data import DataOptionError
from lora_vision.errors import UserError
from lora_vision.lora import LoRAConfigError
from lora_vision.models import ModelConfigError
from lora_vision.performance import PerformanceOptionError
from lora_vision.train import main, run
from tests.helpers import composed

ROOT = Path(__file__).resolve().parents[1]

RECORD_KEYS = {
    "experiment", "model", "method", "rank", "alpha", "targets", "blocks", "trainable_params", "total_params",
    "trainable_percent", "best_val_acc1", "test_acc1", "test_acc5", "epochs", "wall_time_s", "train_images_per_s",
    "seed", "versions", "git_commit", "status",
}  # fmt: skip
# Fields that measure the machine or name the run directory rather than the training outcome.
RUN_SPECIFIC = {"wall_time_s", "train_images_per_s", "output_dir", "best_checkpoint", "adapter_dir", "git_dirty"}


def train(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lora_vision.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The same smoke command, run twice."""
    base = tmp_path_factory.mktemp("smoke")
    runs = [base / "first", base / "second"]
    for run_dir in runs:
        done = train(run_dir, "+exp=smoke")
        assert done.returncode == 0, done.stderr[-3000:]
    return runs


def test_smoke_run_writes_a_complete_record(smoke_runs: list[Path]) -> None:
    run_dir = smoke_runs[0]
    record = json.loads((run_dir / "results.json").read_text())
    assert set(record) >= RECORD_KEYS
    assert record["status"] == "completed"
    assert record["experiment"] == "smoke" and record["method"] == "lora" and record["rank"] == 4
    # The model as built: two blocks of 64 dimensions at random init, not the pretrained ViT-Ti the name tags.
    assert (
        record["model_label"] == "vit_tiny_patch16_224 (depth=2, embed_dim=64, num_heads=2, patch_size=8; random init)"
    )
    assert record["targets"] == ["qv"] and record["epochs"] == 2
    assert 0 < record["trainable_params"] < record["total_params"]
    assert record["trainable_percent"] == pytest.approx(100 * record["trainable_params"] / record["total_params"])
    # The synthetic classes are learnable: well above the 25% of chance after two epochs.
    assert record["best_val_acc1"] > 0.5 and record["test_acc1"] > 0.5
    assert record["test_acc5"] == 1.0  # top-5 of 4 classes
    assert record["wall_time_s"] > 0 and record["train_images_per_s"] > 0
    assert set(record["versions"]) >= {"python", "torch", "timm", "lightning"}
    assert not list(run_dir.glob(".results.json.*"))  # no temporary file left behind


def test_smoke_run_directory_holds_config_metrics_and_checkpoints(smoke_runs: list[Path]) -> None:
    run_dir = smoke_runs[0]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2
    assert "parameter budget" in (run_dir / "train.log").read_text()


def test_same_command_twice_gives_identical_metrics(smoke_runs: list[Path]) -> None:
    first, second = (json.loads((d / "results.json").read_text()) for d in smoke_runs)
    for record in (first, second):
        for key in RUN_SPECIFIC:
            record.pop(key, None)
    assert first == second
    metrics = [(d / "csv" / "metrics.csv").read_text() for d in smoke_runs]
    assert metrics[0] == metrics[1]


def test_grad_checkpointing_trains_to_the_same_metrics(smoke_runs: list[Path], tmp_path: Path) -> None:
    with composed("+exp=smoke", "perf.grad_checkpointing=true", output_dir=tmp_path) as cfg:
        record = run(cfg)
    smoke = json.loads((smoke_runs[0] / "results.json").read_text())
    for key in ("best_val_acc1", "test_acc1", "test_loss"):
        assert record[key] == pytest.approx(smoke[key], abs=1e-6), key


def test_unknown_key_fails_before_training(capsys: pytest.CaptureFixture) -> None:
    # The command line's own check, before Hydra starts (a process shows it in tests/test_command_line.py).
    with pytest.raises(SystemExit) as stopped:
        checked_command_line(["+exp=smoke", "optim.learning_rate=0.1"])
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "optim has no key 'learning_rate'" in stderr and "the keys of optim are lr," in stderr


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug run of the smoke experiment that also logs to W&B: one process for the two tests that read it."""
    run_dir = tmp_path_factory.mktemp("debug") / "run"
    done = train(run_dir, "debug=limit", "+exp=smoke", "logger=[csv,wandb]")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_a_debug_run_records_the_settings_it_ran_with(debug_run: Path) -> None:
    recorded = OmegaConf.load(debug_run / ".hydra" / "config.yaml")
    assert recorded.trainer.limit_train_batches == 5 and recorded.data.num_workers == 0
    assert json.loads((debug_run / "results.json").read_text())["steps"] == 10  # 2 epochs of 5 batches


def test_a_user_error_is_one_message_without_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = train(tmp_path / "run", "+exp=smoke", "lora.rank=0")
    assert done.returncode == 2
    assert "python -m lora_vision.train: error: lora.rank must be an integer >= 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    # With HYDRA_FULL_ERROR=1 the job function lets the error out, for Hydra to print with its traceback; the job
    # function as Hydra calls it, in this process.
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with composed("+exp=smoke", "lora.rank=0", output_dir=tmp_path / "full") as cfg, pytest.raises(LoRAConfigError):
        main(cfg)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU, so trainer=gpu is valid")


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("optim.lr=0", ConfigError, "optim.lr=0 is invalid: expected a number > 0"),
        ("lora.dropout=1.5", LoRAConfigError, "dropout must be in [0, 1)"),
        ("lora.targets=[nothing_matches_this]", LoRAConfigError, "nothing_matches_this"),
        ("model.num_classes=7", ConfigError, "model.num_classes=7 does not match the 4 classes"),
        ("model.name=vit_tiny_patch16_22", ModelConfigError, "vit_tiny_patch16_224"),
        ("model.checkpoint=missing.safetensors", ModelConfigError, "model.checkpoint='missing.safetensors' does not"),
        ("perf.compile=fast", PerformanceOptionError, "perf.compile='fast' is invalid"),
        ("data.val_fraction=2", DataOptionError, "val_fraction must be a number in [0, 1), got 2"),
        ("+lora.rnak=4", ConfigError, "+lora.rnak=4 adds a key that lora_vision does not read; did you mean lora.rank"),
        ("+nonexistent_key=3", ConfigError, "+nonexistent_key=3 adds a key"),
        pytest.param("trainer=gpu", ConfigError, "no CUDA GPU is available on this machine; train on the CPU with "
                     "trainer=cpu", marks=NO_GPU),
    ],
)  # fmt: skip
def test_invalid_values_fail_before_training(override: str, error: type, message: str, tmp_path: Path) -> None:
    with composed("+exp=smoke", override, output_dir=tmp_path) as cfg, pytest.raises(error) as err:
        run(cfg)
    assert isinstance(err.value, UserError)  # reported as a message, without a traceback
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override", ["+trainer.strategy=auto", "+model.kwargs.qkv_bias=true", "++lora.rank=4"])
def test_pass_through_keys_may_be_added(override: str) -> None:
    with composed("+exp=smoke", override) as cfg:
        hydra_cfg = HydraConfig.get()
        check_appended_keys(hydra_cfg.overrides.task, hydra_cfg.runtime.choices, cfg)


def test_wandb_logs_offline_with_the_budget_and_accuracies_in_the_summary(debug_run: Path) -> None:
    (offline_run,) = (debug_run / "wandb").glob("offline-run-*")  # no account, no network: an offline run to sync
    # wandb >= 0.2x keeps an offline run's summary in its binary log (no Python reader ships any more); these keys
    # reach it only through the run-summary update, which `wandb sync` uploads.
    log = next(offline_run.glob("*.wandb")).read_bytes()
    for key in ("trainable_params", "total_params", "trainable_percent", "best_val_acc1", "test_acc1", "test_acc5"):
        assert key.encode() in log, key
