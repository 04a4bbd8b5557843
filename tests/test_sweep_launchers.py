"""Other ways to run jobs: the submitit launcher (locally) and DDP on two CPU processes (the Optuna sweeper has
test_search.py)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from lora_vision.builders import use_allocated_cpus
from tests.helpers import FAST, launch, multirun, records


@pytest.mark.slow
def test_submitit_local_launcher_runs_every_job(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "submitit"
    done = multirun(sweep_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "lora.rank=2,4")
    assert done.returncode == 0, done.stderr[-3000:]
    found = records(sweep_dir)
    assert {job: r["status"] for job, r in found.items()} == {"0": "completed", "1": "completed"}
    assert sorted(r["rank"] for r in found.values()) == [2, 4]
    assert (sweep_dir / "report.md").is_file()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_and_records_once(tmp_path: Path) -> None:
    log_dir = tmp_path / "outputs"
    # The default run directory (named by the start time): Lightning's second process must reuse it.
    done = launch(
        tmp_path,
        *FAST,
        "trainer.devices=2",
        "+trainer.strategy=ddp",
        "logger=[csv,wandb]",
        env={"LORA_VISION_LOG_DIR": str(log_dir)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (log_dir / "smoke").iterdir()
    assert [p.relative_to(run_dir) for p in log_dir.rglob("results.json")] == [Path("results.json")]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    (metrics,) = log_dir.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert len(rows) == len({tuple(row.values()) for row in rows})
    val_epochs = [row["epoch"] for row in rows if row["val/acc1"]]
    assert val_epochs == ["0"]  # one validation row for the one epoch, not one per process
    assert "Traceback" not in done.stderr  # the second process ends cleanly too (its W&B placeholder included)


def test_ddp_that_relaunches_the_script_is_refused_in_a_multirun(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    done = multirun(sweep_dir, "trainer.devices=2", "+trainer.strategy=ddp", "lora.rank=2")
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = records(sweep_dir).values()
    assert record["status"] == "failed"
    assert "trainer.strategy=ddp with trainer.devices=2 re-runs the command line" in record["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun"]  # no second sweep started by a copy


@pytest.mark.parametrize(("omp", "expected"), [(None, 1), ("2", None)])
def test_a_slurm_job_computes_on_the_cpus_it_was_given(
    monkeypatch: pytest.MonkeyPatch, omp: str | None, expected: int | None
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as on a node of two cores or more
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)  # the user's choice stands
    try:
        use_allocated_cpus()
        assert torch.get_num_threads() == (2 if expected is None else expected)
    finally:
        torch.set_num_threads(before)


def test_the_slurm_launcher_without_sbatch_is_one_message_and_runs_nothing(tmp_path: Path) -> None:
    # PATH holds only the Python that runs the command, so no sbatch can be found.
    python_only = str(Path(sys.executable).parent)
    sweep_dir = tmp_path / "slurm"
    done = launch(
        tmp_path, "-m", *FAST, "hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}", env={"PATH": python_only}
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("slurm launcher: error: hydra/launcher=slurm submits with sbatch and srun, which are not")
    assert not list(sweep_dir.glob("*/results.json"))
