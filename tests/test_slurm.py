"""The SLURM path against a real one-node cluster (tests/slurm/cluster.sh): a sweep goes out through sbatch as one
job array with the launcher's settings, a requeued job resumes and ends exactly as an uninterrupted one, and
settings the cluster cannot place are one message. `make test-slurm` runs them; they skip, with the reason, where no
cluster answers."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from safetensors.torch import load_file

from lora_vision.search.heartbeat import RERUN_ATTR
from lora_vision.search.storage import load_study
from lora_vision.search.sweeper import started
from tests.helpers import FAST, launch, multirun, records

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER = Path(__file__).parent / "slurm" / "cluster.sh"
# One CPU and 1 GB per job on the test node's partition, no GPU; 10 minutes, two jobs of an array at a time.
SLURM = (
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
    "hydra.launcher.array_parallelism=2",
    "hydra.launcher.signal_delay_s=30",
)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    status = subprocess.run([CLUSTER, "status"], capture_output=True, text=True)
    if status.returncode != 0:
        pytest.skip("no SLURM cluster answers here: start the test cluster with tests/slurm/cluster.sh start (root)")


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job JOB_ID`'s fields (the first record, for an array task)."""
    shown = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    first = shown.stdout.splitlines()[0]
    return dict(field.split("=", 1) for field in first.split() if "=" in field)


def submitted(sweep: Path) -> list[str]:
    """The SLURM job ids of a sweep's jobs, from submitit's folders: `<array id>_<task>` for array tasks, else the
    job's id."""
    names = [path.name for path in (sweep / ".submitit").iterdir()]
    tasks = sorted(name for name in names if re.fullmatch(r"\d+_\d+", name))
    return tasks or sorted(name for name in names if name.isdigit())


@pytest.mark.parametrize(("sweep", "jobs"), [("rank", 6), ("study", 8)])
def test_a_sweep_goes_out_as_one_job_array_with_the_launcher_settings(tmp_path: Path, sweep: str, jobs: int) -> None:
    done = multirun(tmp_path / sweep, *SLURM, f"+sweep={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    ids = submitted(tmp_path / sweep)
    assert len(ids) == jobs and len({job.split("_")[0] for job in ids}) == 1, ids  # one array, every point
    assert all(record["status"] == "completed" for record in records(tmp_path / sweep).values())
    assert len(records(tmp_path / sweep)) == jobs
    assert (tmp_path / sweep / "report.md").is_file()
    job = scontrol_job(ids[0])
    assert job["Partition"] == "debug" and job["NumCPUs"] == "1" and job["MinMemoryNode"] == "1G"
    assert job["TimeLimit"] == "00:10:00" and job["ArrayTaskThrottle"] == "2" and job["JobState"] == "COMPLETED"
    # The requeue signal is in the script sbatch was given (scontrol does not show it).
    array = ids[0].split("_")[0]
    script = (tmp_path / sweep / ".submitit" / array / f"{array}_submission.sh").read_text()
    assert f"#SBATCH --array=0-{jobs - 1}%2" in script and "#SBATCH --signal=USR2@30" in script


# Long enough to be caught mid-training: 40 epochs of 16 steps, about 12 s on 2 idle cores of an AMD EPYC.
LONG = ("trainer.max_epochs=40", "data.num_samples=512", "data.batch_size=32")


def trained_alike(one: Path, other: Path) -> None:
    """Two run directories hold the same outcome: equal records' metrics and bitwise-equal adapters."""
    mine, theirs = (json.loads((path / "results.json").read_text()) for path in (one, other))
    keys = ("status", "test_acc1", "test_loss", "best_val_acc1", "objective_epoch")
    assert {key: mine[key] for key in keys} == {key: theirs[key] for key in keys}
    trained = load_file(one / "adapter" / "adapter.safetensors")
    for key, tensor in load_file(other / "adapter" / "adapter.safetensors").items():
        assert trained[key].equal(tensor), key


def wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.5)


def test_a_requeued_job_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    reference = multirun(tmp_path / "reference", *SLURM, *LONG)
    assert reference.returncode == 0, reference.stderr[-3000:]
    sweep = tmp_path / "requeued"
    driver = subprocess.Popen(
        [sys.executable, "-m", "lora_vision.train", "-m", *FAST, *SLURM, *LONG, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # The first epoch's end writes last.ckpt: the job is mid-training. Requeue it as a preemption would.
    wait_for(sweep / "0" / "checkpoints" / "last.ckpt", 120)
    (job_id,) = submitted(sweep)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output[-3000:]
    record = json.loads((sweep / "0" / "results.json").read_text())
    assert record["resumed_from"] is not None and scontrol_job(job_id)["Restarts"] == "1"
    trained_alike(sweep / "0", tmp_path / "reference" / "0")


def test_a_job_at_its_time_limit_is_signalled_requeued_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    # A run of about 80 s under a one-minute limit, signalled 10 s before it: each attempt (about 40 s of training
    # once the job has imported) is stopped mid-way, saves where it stands, is requeued and resumes there. The
    # epochs that take 80 s here are found first, from a 20-epoch job, so that this holds on a faster or slower
    # machine alike; up to 10 requeues are allowed.
    calibration = multirun(tmp_path / "calibration", *SLURM, *LONG, "trainer.max_epochs=20")
    assert calibration.returncode == 0, calibration.stderr[-3000:]
    per_epoch = json.loads((tmp_path / "calibration" / "0" / "results.json").read_text())["wall_time_s"] / 20
    epochs = f"trainer.max_epochs={max(5, math.ceil(80 / per_epoch))}"
    limited = ("hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=10", "hydra.launcher.max_num_timeout=10")
    reference = multirun(tmp_path / "reference", *SLURM, *LONG, epochs, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    # Each requeue waits about two minutes before SLURM lets the job start again (its BeginTime).
    timed = multirun(tmp_path / "timed", *SLURM, *LONG, epochs, *limited, timeout=1800)
    assert timed.returncode == 0, timed.stderr[-3000:]
    record = json.loads((tmp_path / "timed" / "0" / "results.json").read_text())
    (job_id,) = submitted(tmp_path / "timed")
    assert record["resumed_from"] is not None and int(scontrol_job(job_id)["Restarts"]) >= 1
    trained_alike(tmp_path / "timed" / "0", tmp_path / "reference" / "0")


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("hydra.launcher.partition=nowhere", "invalid partition specified: nowhere"),
        ("hydra.launcher.cpus_per_task=4096", "Requested node configuration is not available"),
    ],
)
def test_settings_the_cluster_cannot_place_are_one_message_and_nothing_is_queued(
    tmp_path: Path, override: str, words: str
) -> None:
    before = subprocess.run(["squeue", "--noheader"], capture_output=True, text=True).stdout
    done = launch(tmp_path, "-m", *FAST, *SLURM, override, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("slurm launcher: error: SLURM would not run the jobs, nothing was queued:")
    assert words in message and "Traceback" not in done.stderr
    assert subprocess.run(["squeue", "--noheader"], capture_output=True, text=True).stdout == before


def in_a_trial(log: Path, sweep: Path, deadline: float) -> int:
    """The trial a search worker (writing `log`) is training, once it has saved a checkpoint and not finished."""
    while True:
        assert time.monotonic() < deadline, f"{log.name} never got into a trial"
        launched = re.findall(r" trial=(\d+)\n", log.read_text() if log.exists() else "")
        if launched and (sweep / launched[-1] / "checkpoints" / "last.ckpt").exists():
            trial = int(launched[-1])
            if load_study(str(sweep / "optuna.log"), "smoke").trials[trial].state == TrialState.RUNNING:
                return trial
        time.sleep(0.2)


def kill_outright(job_id: str) -> None:
    """SIGKILL every process of a running job, as a lost node ends them: nothing runs its exit handlers. (SLURM's
    `scancel --signal=KILL` does not do this to a batch job: it ends it as it ends any job, SIGTERM first.)"""
    # listpids takes the job's own id, not an array task's name.
    own_id = scontrol_job(job_id)["JobId"]
    listed = subprocess.run(["scontrol", "listpids", own_id], capture_output=True, text=True, check=True).stdout
    pids = [int(line.split()[0]) for line in listed.splitlines()[1:]]
    assert pids, listed
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_search_workers_in_a_job_array_share_the_study_and_a_killed_workers_trial_runs_again(tmp_path: Path) -> None:
    # Three workers of one search on an Optuna journal file, as the README's sbatch line runs them; worker 0 is
    # killed outright mid-trial. Heartbeats every second, a trial silent for 10 s is lost.
    sweep = tmp_path / "optuna"
    search = [
        sys.executable,
        "-m",
        "lora_vision.train",
        "-m",
        *FAST,
        "trainer.max_epochs=15",
        "+sweep=optuna",
        "hydra.sweeper.n_trials=6",
        f"hydra.sweeper.storage={sweep / 'optuna.log'}",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=10",
    ]
    array = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--array=0-2",
            "--partition=debug",
            "--cpus-per-task=1",
            "--mem=2G",
            f"--output={tmp_path}/worker-%a.out",
            f"--chdir={tmp_path}",
            "--wrap",
            shlex.join(search),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    killed = in_a_trial(tmp_path / "worker-0.out", sweep, deadline := time.monotonic() + 300)
    kill_outright(f"{array}_0")
    while subprocess.run(["squeue", "--noheader", f"--jobs={array}"], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline + 600, "the workers did not finish"
        time.sleep(1)

    logs = [(tmp_path / f"worker-{task}.out").read_text() for task in range(3)]
    study = load_study(str(sweep / "optuna.log"), "smoke")
    trials = study.trials
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 6 and states.count(TrialState.FAIL) == 1, states
    assert trials[killed].state == TrialState.FAIL and started(study) == 6
    (rerun,) = [t for t in trials if t.user_attrs.get(RERUN_ATTR) == killed]
    assert rerun.state == TrialState.COMPLETE and rerun.params == trials[killed].params
    assert any(f"trial {killed}: its worker was lost: no heartbeat for" in log for log in logs[1:])
    # Each trial launched once, by one worker: the killed one, and its parameters again as the rerun trial.
    launched = [int(n) for log in logs for n in re.findall(r" trial=(\d+)\n", log)]
    assert sorted(launched) == list(range(7)), launched
    done = records(sweep)
    assert {int(name) for name, r in done.items() if r["status"] == "completed"} == set(range(7)) - {killed}


def test_ddp_as_two_slurm_tasks_trains_once_and_rank_zero_alone_writes(tmp_path: Path) -> None:
    sweep = tmp_path / "ddp"
    # Two tasks of one CPU each, started by srun: Lightning reads the world from SLURM and trains DDP over gloo.
    ddp = ("hydra.launcher.tasks_per_node=2", "trainer.devices=2", "+trainer.strategy=ddp", "trainer.max_epochs=2")
    done = multirun(sweep, *SLURM, *ddp, "logger=[csv]")
    assert done.returncode == 0, done.stderr[-3000:]
    (job_id,) = submitted(sweep)
    assert scontrol_job(job_id)["NumTasks"] == "2"
    logs = [path.read_text() for path in sorted((sweep / ".submitit" / job_id).glob("*_log.err"))]
    assert len(logs) == 2
    for rank, log in enumerate(logs):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in log, log[-2000:]
    # One record and one metrics file, written by rank zero; each epoch validated once, over both ranks' shards.
    assert list(sweep.rglob("results.json")) == [sweep / "0" / "results.json"]
    record = json.loads((sweep / "0" / "results.json").read_text())
    assert record["status"] == "completed" and record["epochs"] == 2 and record["test_acc1"] is not None
    (metrics,) = sweep.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert [row["epoch"] for row in rows if row["val/acc1"]] == ["0", "1"]
