"""Under load: one multirun of 20 short runs leaves 20 complete, separate results and W&B offline runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Its one multirun of 20 runs takes half a minute: started first, it does not hold the suite's end (conftest.py).
pytestmark = pytest.mark.slow

RUNS = 20


@pytest.mark.slow
def test_twenty_runs_leave_twenty_complete_separate_results(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # Jobs of a local multirun share one process: W&B, loggers and Lightning state must not leak between them.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_DIR", None)
    done = subprocess.run(
        [
            sys.executable, "-m", "lora_vision.train", "-m", "+exp=smoke", f"seed=range({RUNS})", "logger=[csv,wandb]",
            "trainer.max_epochs=1", "data.num_samples=64", "data.num_test_samples=32", f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == [str(i) for i in range(RUNS)]
    records = [json.loads((job / "results.json").read_text()) for job in jobs]
    assert [r["status"] for r in records] == ["completed"] * RUNS
    assert [r["seed"] for r in records] == list(range(RUNS))
    assert [r["output_dir"] for r in records] == [str(job) for job in jobs]  # each run wrote only its own directory
    for job in jobs:
        (offline_run,) = (job / "wandb").glob("offline-run-*")  # one W&B run per job, inside the job
        assert next(offline_run.glob("*.wandb")).stat().st_size > 0
        assert len(list((job / "checkpoints").glob("*.ckpt"))) == 2
        assert not list(job.glob(".results.json.*"))  # no temporary file left behind
    offline_runs = {run.name for job in jobs for run in (job / "wandb").glob("offline-run-*")}
    assert len(offline_runs) == RUNS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing written beside the sweep
    # The sweep report pools the seeds of this one configuration: it must count every run, none failed.
    (report,) = csv.DictReader((sweep / "report.csv").open())
    assert (report["runs"], report["failed"]) == (str(RUNS), "0")
