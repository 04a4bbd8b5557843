"""The SLURM path against a real one-node cluster (tests/slurm/cluster.sh): a sweep goes out through sbatch as one
job array with the launcher's settings, a requeued job resumes and ends exactly as an uninterrupted one, and
settings the cluster cannot place are one message. `make test-slurm` runs them; they skip, with the reason, where no
cluster answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

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
    # A run of about 90 s (300 short epochs) under a one-minute limit, signalled 15 s before it (after the job's
    # imports, which take seconds): each attempt is stopped mid-way, saves where it stands, is requeued and resumes
    # there; the attempts allowed cover a machine several times slower.
    epochs = "trainer.max_epochs=300"
    limited = ("hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=15", "hydra.launcher.max_num_timeout=10")
    limited += (*LONG, epochs)
    # Each requeue waits about two minutes before SLURM lets the job start again (its BeginTime).
    reference = multirun(tmp_path / "reference", *SLURM, *LONG, epochs, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    timed = multirun(tmp_path / "timed", *SLURM, *limited, timeout=1800)
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
