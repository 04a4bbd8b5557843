"""Multirun sweeps end to end: every job's record, failed jobs that do not stop the sweep, the automatic report."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lora_vision.report import build_report
from lora_vision.report.hydra_callback import SweepReport
from lora_vision.train import main
from tests.helpers import CONF, FAST, composed, multirun, records

REPORT_FILES = ("report.md", "report.csv", "report.png")


def table_rows(report_md: Path) -> list[str]:
    lines = [line for line in report_md.read_text().splitlines() if line.startswith("|")]
    return lines[2:]  # after the header and the separator


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks x 2 target sets in one multirun."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    done = multirun(sweep_dir, "lora.rank=2,4", "lora.targets=[qv],[mlp]")
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep_dir


def test_every_job_of_the_sweep_writes_its_record(sweep: Path) -> None:
    found = records(sweep)
    assert sorted(found) == ["0", "1", "2", "3"]
    assert {r["status"] for r in found.values()} == {"completed"}
    assert {(r["rank"], tuple(r["targets"])) for r in found.values()} == {
        (2, ("qv",)),
        (2, ("mlp",)),
        (4, ("qv",)),
        (4, ("mlp",)),
    }


def test_the_sweep_ends_with_its_report(sweep: Path) -> None:
    for name in REPORT_FILES:
        assert (sweep / name).is_file(), name
    assert (sweep / "report.md").read_text().startswith("# smoke\n")
    assert len(table_rows(sweep / "report.md")) == 4
    assert len((sweep / "report.csv").read_text().splitlines()) == 1 + 4
    assert (sweep / "report.png").read_bytes().startswith(b"\x89PNG")


def test_the_sweep_report_is_deterministic(sweep: Path, tmp_path: Path) -> None:
    automatic = {name: (sweep / name).read_bytes() for name in REPORT_FILES}
    for attempt in ("first", "second"):
        build_report([sweep], tmp_path / attempt, title="smoke")
    for name in REPORT_FILES:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
        assert (tmp_path / "first" / name).read_bytes() == automatic[name], name


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    # Rank 999 exceeds the 64-d toy ViT's layers: the second job fails while the adapters are applied.
    done = multirun(sweep_dir, "lora.rank=999,2")
    assert done.returncode == 0, done.stderr[-3000:]
    failed, completed = records(sweep_dir)["0"], records(sweep_dir)["1"]
    assert completed["status"] == "completed" and completed["rank"] == 2
    assert failed["status"] == "failed" and failed["rank"] == 999
    assert "LoRAConfigError" in failed["error"] and "999" in failed["error"]
    assert "lora.rank=999" in failed["overrides"]
    log = (sweep_dir / "0" / "train.log").read_text()
    assert "job failed, the sweep goes on: LoRAConfigError" in log and "Traceback" not in log  # a user error
    report = (sweep_dir / "report.md").read_text()
    assert (
        len(table_rows(sweep_dir / "report.md")) == 2
        and "1 (1 failed)" in report
        and "Runs that did not complete:" in report
    )


def test_a_failed_single_run_still_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The job function of `python -m lora_vision.train` given a single run's config, as Hydra gives it; that the
    # process exits with the status it raises is checked with a process in test_train.py.
    with composed(*FAST, "lora.rank=999", output_dir=tmp_path / "run") as cfg, pytest.raises(SystemExit) as stopped:
        main(cfg)
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "python -m lora_vision.train: error: " in err and "999" in err


def test_the_report_goes_to_wandb_when_a_wandb_logger_is_configured(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    sweep_dir = shutil.copytree(sweep, tmp_path / "multirun")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        config = compose(
            "train", overrides=["exp=smoke", "logger=wandb", f"hydra.sweep.dir={sweep_dir}"], return_hydra_config=True
        )
    SweepReport().on_multirun_end(config)
    (run_dir,) = (sweep_dir / "wandb").glob("offline-run-*")
    tables = list(run_dir.glob("files/media/table/report/table_*.table.json"))
    images = list(run_dir.glob("files/media/images/report/accuracy_vs_params_*.png"))
    assert len(tables) == 1 and len(images) == 1
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 4 and table["columns"][:4] == ["model", "method", "variant", "targets"]
    # W&B's service process writes the run's transaction log (what `wandb sync` uploads) in the background; the
    # end of a sweep's process stops the service, which flushes it. This process lives on, so it stops the service
    # as that exit would, and gives the write a bounded time (once seen here: only the log's 8-byte header, read
    # right after `finish()`).
    import wandb

    wandb.teardown()
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 30
    while b"smoke-report" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"smoke-report" in log.read_bytes()  # the run's name
