"""Other ways to run jobs: the Optuna sweeper, the submitit launcher (locally) and DDP on two CPU processes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from tests.helpers import FAST, launch, multirun, records


def test_optuna_sweep_tells_failed_trials_and_finds_the_best(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    # With the sampler's fixed seed the third trial draws rank 999, which fails while the adapters are applied.
    trials = ("hydra.sweeper.n_trials=3", "lora.rank=choice(2,999)", "objective.param_penalty=0.01")
    done = multirun(sweep_dir, "+sweep=optuna", *trials)
    assert done.returncode == 0, done.stderr[-3000:]
    found = records(sweep_dir)
    assert len(found) == 3
    completed = [r for r in found.values() if r["status"] == "completed"]
    assert [r["rank"] for r in found.values() if r["status"] == "failed"] == [999]
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    objectives = [r["best_val_acc1"] - 0.01 * math.log10(r["trainable_params"]) for r in completed]
    assert math.isclose(best.best_value, max(objectives))
    assert set(best.best_params) == {"optim.lr", "lora.rank", "lora.alpha", "lora.targets"}
    assert (sweep_dir / "report.md").is_file()


def test_submitit_local_launcher_runs_every_job(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "submitit"
    done = multirun(sweep_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "lora.rank=2,4")
    assert done.returncode == 0, done.stderr[-3000:]
    found = records(sweep_dir)
    assert {job: r["status"] for job, r in found.items()} == {"0": "completed", "1": "completed"}
    assert sorted(r["rank"] for r in found.values()) == [2, 4]
    assert (sweep_dir / "report.md").is_file()


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
