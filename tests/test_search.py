"""The Optuna sweeper (`+sweep=optuna`, lora_vision.search): search space, failed and pruned trials, resuming a
study, two workers on one study and its budget when they race, a seed per trial, the two-objective Pareto front
and seeded reproducibility."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from packaging.version import Version

from lora_vision.cli import canonical_overrides, checked_command_line
from lora_vision.report.collect import pareto_front
from lora_vision.search import sweeper as sweeper_module
from lora_vision.search.heartbeat import BEAT_ATTR, INTERRUPTED_ATTR, RERUN_ATTR
from lora_vision.search.seeding import SEED_ATTR, trial_seed
from lora_vision.search.space import SearchSpaceError, as_override, parse_search_space
from lora_vision.search.storage import load_study
from lora_vision.search.sweeper import (
    SURPLUS_ATTR,
    OptunaSweeper,
    SweepConfigError,
    counted,
    directions,
    objective_values,
    started,
)
from tests.helpers import CONF, FAST, launch, multirun, records

ROOT = Path(__file__).resolve().parents[1]


def study(sweep_dir: Path, name: str = "smoke", storage: str = "sqlite:///{}/optuna.db") -> optuna.Study:
    return load_study(storage.format(sweep_dir), name)


def results_files(sweep_dir: Path) -> dict[str, Path]:
    """results.json of every trial's run, by run directory name."""
    return {path.parent.name: path for path in sweep_dir.glob("*/results.json")}


def trial_params(sweep_dir: Path, name: str = "smoke") -> list[dict]:
    return [t.params for t in sorted(study(sweep_dir, name).trials, key=lambda t: t.number)]


def test_search_space_reads_hydra_sweep_syntax() -> None:
    space, fixed = parse_search_space(
        [
            "optim.lr=tag(log, interval(1e-4, 1e-2))",
            "lora.rank=choice(1, 2, 4)",
            "lora.alpha=interval(1, 64)",
            "trainer.accumulate_grad_batches=tag(int, log, interval(1, 8))",
            "seed=range(0, 10, 2)",
            "data.batch_size=64",
            # The command line comes after the search-space file and replaces its entry.
            "lora.rank=choice(8, 16)",
        ]
    )
    assert space == {
        "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "lora.rank": CategoricalDistribution([8, 16]),
        "lora.alpha": FloatDistribution(1.0, 64.0),
        "trainer.accumulate_grad_batches": IntDistribution(1, 8, log=True),
        "seed": IntDistribution(0, 8, step=2),
    }
    assert fixed == {"data.batch_size": "64"}
    assert parse_search_space(["lora.rank=choice(1,2)", "lora.rank=4"]) == ({}, {"lora.rank": "4"})
    assert [as_override("a", v) for v in (1e-05, 3, "qv", True, None)] == [
        "a=1e-05",
        "a=3",
        "a=qv",
        "a=true",
        "a=null",
    ]
    with pytest.raises(SearchSpaceError, match=re.escape("optim.lr=glob")):
        parse_search_space(["optim.lr=glob(*)"])


def grid(distribution: BaseDistribution) -> list:
    """Every value a discrete distribution can draw."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    assert isinstance(distribution, IntDistribution)
    return list(range(distribution.low, distribution.high + 1, distribution.step))


@pytest.mark.parametrize(
    "sweep", ["range(1,11,3)", "range(0.1,0.7,0.2)", "range(10,0,-3)", "range(0,1,0.1)", "range(4)", "range(2.0,3.0)"]
)
def test_a_range_searches_the_values_hydras_basic_sweeper_runs(sweep: str) -> None:
    overrides = OverridesParser.create().parse_overrides([f"x={sweep}"])
    (jobs,) = BasicSweeper.split_arguments(overrides, None)
    space, _ = parse_search_space([f"x={sweep}"])
    assert sorted(as_override("x", v) for v in grid(space["x"])) == sorted(job for (job,) in jobs)


def test_an_empty_range_is_refused() -> None:
    with pytest.raises(SearchSpaceError, match=re.escape("x=range(5,1): the range has no values")):
        parse_search_space(["x=range(5,1)"])


def test_directions_and_returned_values_are_checked() -> None:
    assert directions("maximize") == ["maximize"]
    assert directions(["maximize", "minimize"]) == ["maximize", "minimize"]
    with pytest.raises(SweepConfigError, match=re.escape("hydra.sweeper.direction=up")):
        directions("up")
    assert objective_values(0.5, 1) == [0.5]
    assert objective_values([0.5, 1200], 2) == [0.5, 1200.0]
    assert objective_values(None, 1) is None and objective_values(math.nan, 1) is None
    with pytest.raises(SweepConfigError, match=re.escape("objective.pareto=true")):
        objective_values(0.5, 2)


# With seed 3 two of the first three trials draw rank 999, which fails while the adapters are applied.
FAILING_SEARCH = (
    "+sweep=optuna",
    "hydra.sweeper.sampler.seed=3",
    "lora.rank=choice(2,999)",
    "objective.param_penalty=0.01",
)


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The sweep directory of a search of three trials; a copy of it, which the same command with a budget of four
    continued; and that launch. The continued search needs no search of its own to continue."""
    root = tmp_path_factory.mktemp("searched")
    first, continued = root / "first" / "optuna", root / "continued" / "optuna"
    done = multirun(first, *FAILING_SEARCH, "hydra.sweeper.n_trials=3")
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(first, continued)  # the study's database is in the sweep directory
    again = multirun(continued, *FAILING_SEARCH, "hydra.sweeper.n_trials=4")
    assert again.returncode == 0, again.stderr[-3000:]
    return first, continued, again


def test_failed_trials_are_told_as_failed_and_the_best_is_found(
    searched: tuple[Path, Path, subprocess.CompletedProcess],
) -> None:
    sweep_dir, _, _ = searched
    found = records(sweep_dir)
    # Each trial's run directory is its number.
    assert {name: r["trial"] for name, r in found.items()} == {"0": 0, "1": 1, "2": 2}
    states = {t.number: t.state for t in study(sweep_dir).trials}
    for record in found.values():
        failed = record["status"] == "failed"
        assert failed == (record["rank"] == 999)
        assert states[record["trial"]] == (TrialState.FAIL if failed else TrialState.COMPLETE)
    completed = [r for r in found.values() if r["status"] == "completed"]
    assert completed
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    objectives = [r["best_val_acc1"] - 0.01 * math.log10(r["trainable_params"]) for r in completed]
    assert math.isclose(best.best_value, max(objectives))
    assert set(best.best_params) == {"optim.lr", "lora.rank", "lora.alpha", "lora.targets"}
    assert (sweep_dir / "report.md").is_file()


# Trials with a learning rate of 1e-9 do not learn; after the first trial, the median pruner stops any that fall
# behind the others' accuracy after the same epoch.
PRUNED_SEARCH = (
    "+exp=smoke",
    "+sweep=optuna",
    "trainer.max_epochs=3",
    "optim.lr=choice(3e-2,1e-9)",
    "lora.targets=qv",
    "lora.rank=4",
    "lora.alpha=8",
    "hydra/sweeper/pruner=median",
    "hydra.sweeper.pruner.n_startup_trials=1",
)


@pytest.mark.slow
def test_the_pruner_stops_hopeless_trials_and_they_count_towards_the_budget(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    done = launch(tmp_path, "-m", *PRUNED_SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    found = records(sweep_dir)
    states = {t.number: t.state for t in study(sweep_dir).trials}
    pruned = [r for r in found.values() if r["status"] == "pruned"]
    assert pruned, "no trial was pruned"
    for record in pruned:
        assert states[record["trial"]] == TrialState.PRUNED
        assert record["pruned_at_epoch"] < 2 and record["epochs"] < 3  # stopped before its last epoch
        assert record["test_acc1"] is None and not record["tested"]
    assert all(states[r["trial"]] == TrialState.COMPLETE for r in found.values() if r["status"] == "completed")
    assert "pruned by the search after epoch" in (sweep_dir / "report.md").read_text()

    # With the budget spent, pruned trials included, the same command again launches nothing and leaves every run as
    # it was (a continued search, with a larger budget, is tested below).
    before = {name: (sweep_dir / name / "results.json").read_bytes() for name in found}
    spent = launch(tmp_path, "-m", *PRUNED_SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep_dir}")
    assert spent.returncode == 0 and len(study(sweep_dir).trials) == 4
    assert {name: path.read_bytes() for name, path in results_files(sweep_dir).items()} == before


def two_workers(tmp_path: Path, command: list[str], **env: str) -> list[str]:
    """The logs of two copies of `command` started at once from `tmp_path`, offline, once both have succeeded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), **env}
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(log[-2000:] for log in logs)
    return logs


# The default SQLite database, and an Optuna journal file (what workers on a network file system should use).
@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite:///{}/optuna.db", "{}/optuna.log"])
def test_two_workers_share_one_study_and_run_no_trial_twice(tmp_path: Path, storage: str) -> None:
    sweep_dir = tmp_path / "optuna"
    command = [
        sys.executable,
        "-m",
        "lora_vision.train",
        "-m",
        *FAST,
        "+sweep=optuna",
        "hydra.sweeper.n_trials=6",
        f"hydra.sweeper.storage={storage.format(sweep_dir)}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    logs = two_workers(tmp_path, command)
    launched = [[n for n in range(6) if f" trial={n}\n" in log] for log in logs]
    assert all(launched), "a worker ran no trial"  # both pulled from the study
    assert sorted(launched[0] + launched[1]) == list(range(6))  # every trial once, none twice
    assert {name: r["trial"] for name, r in records(sweep_dir).items()} == {str(n): n for n in range(6)}
    trials = study(sweep_dir, storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    # Each trial drew with a seed of its own, so the workers, started together, proposed six different points.
    assert len({str(t.params) for t in trials}) == 6


# Run as `python -c RACING_WORKER ARGS` instead of `python -m lora_vision.train ARGS`: the two workers start the
# search together and then wait for each other before asking for a trial, so that both have counted the trials
# already started before either starts one (a worker waiting for the other's claim lock is let go after 5 s).
RACING_WORKER = """
import os, runpy, time
from pathlib import Path
import optuna

def together(original, step, timeout):
    def wrapper(*args, **kwargs):
        folder = Path(os.environ["RENDEZVOUS_DIR"])
        (folder / f"{step}.{os.getpid()}").touch()
        deadline = time.monotonic() + timeout
        while len(list(folder.glob(f"{step}.*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        return original(*args, **kwargs)
    return wrapper

optuna.create_study = together(optuna.create_study, "start", 120)
optuna.Study.ask = together(optuna.Study.ask, "ask", 5)
runpy.run_module("lora_vision.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_two_workers_racing_for_the_last_trial_start_only_one(tmp_path: Path) -> None:
    sweep_dir, rendezvous = tmp_path / "optuna", tmp_path / "rendezvous"
    rendezvous.mkdir()
    command = [sys.executable, "-c", RACING_WORKER, "-m", *FAST, "+sweep=optuna", "hydra.sweeper.n_trials=1"]
    logs = two_workers(tmp_path, [*command, f"hydra.sweep.dir={sweep_dir}"], RENDEZVOUS_DIR=str(rendezvous))
    assert len(list(rendezvous.glob("start.*"))) == 2  # both searched the study at once
    assert [t.state for t in study(sweep_dir).trials] == [TrialState.COMPLETE]
    assert sum(" trial=0\n" in log for log in logs) == 1


@pytest.mark.slow
def test_a_continued_search_draws_new_points_and_the_report_names_the_seed(
    searched: tuple[Path, Path, subprocess.CompletedProcess],
) -> None:
    # The same command with a larger budget: TPE is still drawing at random, with a seed the first launch never used.
    first, sweep_dir, again = searched
    trials = study(sweep_dir).trials
    assert len(trials) == 4 and trials[3].params not in [t.params for t in trials[:3]]
    # The new trial runs in a directory of its own; the earlier trials' runs are untouched.
    assert sorted(records(sweep_dir)) == ["0", "1", "2", "3"]
    earlier = {name: path.read_bytes() for name, path in results_files(first).items()}
    assert {name: results_files(sweep_dir)[name].read_bytes() for name in earlier} == earlier
    assert [t.user_attrs[SEED_ATTR] for t in trials] == [trial_seed(3, n) for n in range(4)]
    log = again.stdout + again.stderr
    assert "3 of 4 trials already started; sampler TPESampler, seed 3 (" in log and "; pruner none" in log

    best = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    assert best["seed"] == 3 and best["sampler"] == "TPESampler"
    assert best["trial_seed"] == trial_seed(3, best["trial"])
    # The value is in fractions, as the runs return their accuracies; the file says so.
    completed = [r for r in records(sweep_dir).values() if r["status"] == "completed"]
    objectives = [r["best_val_acc1"] - 0.01 * math.log10(r["trainable_params"]) for r in completed]
    assert math.isclose(best["best_value"], max(objectives))
    assert best["objective"].startswith("val/acc1 (max) penalised by 0.01 per tenfold")
    assert "accuracies are fractions: 1.0 = 100 %" in best["objective"]
    report = (sweep_dir / "report.md").read_text()
    assert "Optuna search (optimization_results.yaml): sampler TPESampler, seed 3; each trial drew" in report


def running_trial(sweep_dir: Path, rank: int, beaten: float) -> optuna.Trial:
    """Start a trial of the study as a worker would, drawing `rank`, its last beat at `beaten`."""
    lost = study(sweep_dir)
    lost.enqueue_trial({"lora.rank": rank})
    trial = lost.ask()
    trial.suggest_categorical("lora.rank", [2, 4])
    trial.set_user_attr(BEAT_ATTR, beaten)
    return trial


@pytest.mark.slow
def test_a_trial_whose_worker_is_lost_runs_again_with_its_parameters(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    search = ("+sweep=optuna", "lora.targets=qv", "lora.rank=choice(2,4)", "optim.lr=1e-3", "lora.alpha=8")
    first = multirun(sweep_dir, *search, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    # Two other workers: one lost an hour ago, one alive (this test beats for it) until the search has nothing left
    # to claim and waits for it; then it is lost too.
    gone = running_trial(sweep_dir, 2, beaten=time.time() - 3600).number
    alive = running_trial(sweep_dir, 4, beaten=time.time())
    lost = threading.Event()

    def beat() -> None:
        while not lost.wait(0.5):
            alive.set_user_attr(BEAT_ATTR, time.time())

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    beats = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")
    command = [sys.executable, "-m", "lora_vision.train", "-m", *FAST, *search, "hydra.sweeper.n_trials=3", *beats]
    log_file = tmp_path / "search.log"
    with log_file.open("w") as log_out:
        worker = subprocess.Popen(
            [*command, f"hydra.sweep.dir={sweep_dir}"],
            cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)},
            stdout=log_out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while "still running elsewhere: waiting for them" not in log_file.read_text():
            assert time.monotonic() < deadline and worker.poll() is None, log_file.read_text()[-3000:]
            time.sleep(0.2)
        lost.set()
        beater.join()
        assert worker.wait(timeout=180) == 0, log_file.read_text()[-3000:]
    log = log_file.read_text()
    trials = study(sweep_dir).trials
    # The stale trial ran again at once; the one whose beats stopped ran again once silent for 3 s: three trials
    # completed, the lost two failed and no longer count, none is left running.
    assert [t.state for t in trials if t.number in (gone, alive.number)] == [TrialState.FAIL] * 2
    reruns = {t.user_attrs[RERUN_ATTR]: t for t in trials if RERUN_ATTR in t.user_attrs}
    assert sorted(reruns) == [gone, alive.number]
    assert reruns[gone].params == {"lora.rank": 2} and reruns[alive.number].params == {"lora.rank": 4}
    assert all(t.state == TrialState.COMPLETE for t in reruns.values())
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3 and len(trials) == 5
    assert started(study(sweep_dir)) == 3
    assert f"trial {gone}: its worker was lost: no heartbeat for" in log
    assert f"trial {alive.number}: its worker was lost: no heartbeat for" in log
    # A rerun trial runs in a directory of its own; the lost trials' directories were never written.
    assert {r["trial"] for r in records(sweep_dir).values()} == {
        t.number for t in trials if t.state == TrialState.COMPLETE
    }


@pytest.mark.slow
def test_a_worker_stopped_by_sigterm_leaves_its_trial_to_run_again(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    search = ("+sweep=optuna", "trainer.max_epochs=200", "hydra.sweeper.n_trials=2")
    command = [sys.executable, "-m", "lora_vision.train", "-m", *FAST, *search, f"hydra.sweep.dir={sweep_dir}"]
    worker = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (sweep_dir / "0" / "checkpoints" / "last.ckpt").exists():
        assert time.monotonic() < deadline and worker.poll() is None, "trial 0 never saved a checkpoint"
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 143, output[-3000:]
    trials = study(sweep_dir).trials
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[INTERRUPTED_ATTR].endswith("(SystemExit)")
    assert trials[1].state == TrialState.WAITING and trials[1].user_attrs[RERUN_ATTR] == 0
    assert started(study(sweep_dir)) == 0


TPE = {"_target_": "optuna.samplers.TPESampler", "seed": 0}
ASK = optuna.Study.ask


def racing_workers(storage: str, n_trials: int, count: int) -> list[tuple[OptunaSweeper, optuna.Study]]:
    """`count` sweepers on one study, as separate processes would open it: each with its own storage object."""
    workers = []
    for _ in range(count):
        sweeper = OptunaSweeper(
            sampler=OmegaConf.create(TPE),
            direction="maximize",
            storage=storage,
            study_name="race",
            n_trials=n_trials,
            n_jobs=1,
            max_failure_rate=1.0,
            params=None,
        )
        sweeper.config = OmegaConf.create({})  # what `setup` gives it: an app without an objective
        sweeper.directions = sweeper.study_directions()
        workers.append((sweeper, sweeper.create_study()))
    return workers


@pytest.mark.parametrize(
    ("objective", "direction", "expected"),
    [
        ({"mode": "max", "pareto": False}, None, ["maximize"]),
        ({"mode": "min", "pareto": False}, None, ["minimize"]),
        ({"mode": "max", "pareto": True}, None, ["maximize", "minimize"]),
        ({"mode": "min", "pareto": False}, "minimize", ["minimize"]),
        (None, None, ["maximize"]),
        (None, "minimize", ["minimize"]),
    ],
)
def test_the_study_direction_follows_the_objective(objective: dict | None, direction: str | None, expected) -> None:
    # A run that selects its epoch by the lowest loss is searched for the lowest loss, with no second setting.
    settings = {"storage": None, "study_name": "s", "n_trials": 1, "n_jobs": 1, "max_failure_rate": 1.0}
    sweeper = OptunaSweeper(sampler=OmegaConf.create(TPE), direction=direction, params=None, **settings)
    sweeper.config = OmegaConf.create({} if objective is None else {"objective": objective})
    assert sweeper.study_directions() == expected


def race(workers: list[tuple[OptunaSweeper, optuna.Study]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker claims and finishes trials until the budget is spent, all at once: each worker waits before it
    asks for a trial until all have counted the trials started (or for a second, as a worker that waits for the
    claim lock never gets there)."""
    barrier = threading.Barrier(len(workers), timeout=1.0)

    def ask_together(study: optuna.Study, *args, **kwargs) -> optuna.Trial:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        return ASK(study, *args, **kwargs)

    def work(sweeper: OptunaSweeper, study: optuna.Study) -> None:
        space = {"lr": FloatDistribution(1e-4, 1e-2, log=True)}
        while (trial := sweeper.claim(study, space)) is not None:
            study.tell(trial, trial.params["lr"])

    monkeypatch.setattr(optuna.Study, "ask", ask_together)
    threads = [threading.Thread(target=work, args=worker) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


@pytest.mark.parametrize("storage", ["sqlite:///{}/optuna.db", "{}/optuna.log"])
def test_workers_that_count_at_once_never_start_more_than_the_budget(
    tmp_path: Path, storage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A study in a file: the claim lock lets one worker at a time count and start, so none starts a surplus trial.
    race(racing_workers(storage.format(tmp_path), n_trials=2, count=4), monkeypatch)
    trials = load_study(storage.format(tmp_path), "race").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2


def test_without_a_lock_the_trial_number_keeps_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A study on a database server has no claim lock: all four workers count 0 of 2 and start a trial each.
    monkeypatch.setattr(sweeper_module, "claim_lock", lambda storage: contextlib.nullcontext())
    storage = f"sqlite:///{tmp_path}/optuna.db"
    race(racing_workers(storage, n_trials=2, count=4), monkeypatch)
    trials = load_study(storage, "race").trials
    # The two numbered first ran; the others are marked, drew nothing and do not count.
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 2
    assert [counted(t) for t in trials] == [True, True, False, False]
    assert all(SURPLUS_ATTR in t.user_attrs and not t.params for t in trials[2:])
    # A larger budget later runs two more, numbered after the surplus ones.
    race(racing_workers(storage, n_trials=4, count=1), monkeypatch)
    assert [t.state for t in load_study(storage, "race").trials][4:] == [TrialState.COMPLETE] * 2


def test_each_trial_draws_with_a_seed_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two launches and then a fresh study with the same seed: new points for the continued search, the same
    # points for the same trial numbers of the fresh study.
    continued, fresh = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    for storage, budgets in ((continued, (3, 6)), (fresh, (6,))):
        for n_trials in budgets:
            race(racing_workers(storage, n_trials=n_trials, count=1), monkeypatch)
    trials = load_study(continued, "race").trials
    assert len({t.params["lr"] for t in trials}) == 6
    assert [t.params for t in load_study(fresh, "race").trials] == [t.params for t in trials]
    assert [t.user_attrs[SEED_ATTR] for t in trials] == [trial_seed(0, n) for n in range(6)]
    assert len({trial_seed(0, n) for n in range(6)} | {trial_seed(1, 0)}) == 7
    (sweeper, _), *_ = racing_workers(continued, n_trials=1, count=1)
    sweeper.sampler.seed = -1
    with pytest.raises(SweepConfigError, match=re.escape("hydra.sweeper.sampler.seed=-1: give an integer >= 0")):
        sweeper.check()


PARETO_SEARCH = (
    "+sweep=optuna_pareto",
    "hydra.sweeper.n_trials=5",
    "hydra.sweeper.sampler.n_startup_trials=2",
    "lora.rank=choice(1,2,4,8)",
    "lora.targets=choice(qv,all_linear)",
)


@pytest.mark.slow
def test_pareto_search_writes_the_front_and_same_seed_repeats_the_trials(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for sweep_dir in (first, second):
        done = multirun(sweep_dir, *PARETO_SEARCH)
        assert done.returncode == 0, done.stderr[-3000:]
    # Seeded: the same command proposes the same sequence of trials (after the random start-up ones, TPE's
    # proposals depend on the results, which training reproduces bit for bit).
    sequence = trial_params(first, "smoke_pareto")
    assert len({str(p) for p in sequence}) > 1
    assert trial_params(second, "smoke_pareto") == sequence

    found = [r for r in records(first).values() if r["status"] == "completed"]
    expected = pareto_front((r["trainable_params"], r["best_val_acc1"]) for r in found)
    front = OmegaConf.to_container(OmegaConf.load(first / "pareto_front.yaml"))["pareto_front"]
    assert sorted((params, acc) for acc, params in (t["values"] for t in front)) == sorted(expected)
    by_trial = {r["trial"]: r for r in found}
    for entry in front:
        assert entry["values"] == [
            by_trial[entry["trial"]]["best_val_acc1"],
            by_trial[entry["trial"]]["trainable_params"],
        ]
    report = (first / "report.md").read_text()
    assert "## Pareto front of the search" in report
    assert all(f"| {entry['trial']} | " in report for entry in front)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("+sweep=optuna", "objective.metric=val/loss", "objective.mode=min", "hydra.sweeper.direction=maximize"),
            "hydra.sweeper.direction=maximize disagrees with objective.mode=min",
        ),
        (
            ("+sweep=optuna", "hydra/sweeper/pruner=median", "hydra.sweeper.storage=null"),
            "hydra.sweeper.pruner needs hydra.sweeper.storage",
        ),
        (("+sweep=optuna_pareto", "hydra/sweeper/pruner=median"), "Optuna cannot prune a multi-objective study"),
        (("+sweep=optuna", "hydra.sweeper.n_trials=0"), "hydra.sweeper.n_trials=0: give an integer >= 1"),
    ],
)
def test_a_search_that_cannot_work_is_refused_before_any_trial(overrides: tuple[str, ...], message: str) -> None:
    # The sweeper as Hydra builds it from the composed config; the command line's message and exit status are
    # checked once, below.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=canonical_overrides([*FAST, *overrides]), return_hydra_config=True)
    sweeper = instantiate(cfg.hydra.sweeper)
    sweeper.config = cfg
    with pytest.raises(SweepConfigError, match=re.escape(message)):
        sweeper.check()


def test_a_search_that_cannot_work_is_one_message_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # The sweep as Hydra starts it, in this process; the exit status of a process whose sweep ends this way is
    # checked with a storage that cannot open (below), which ends in the same handler.
    sweep_dir = tmp_path / "optuna"
    overrides = [*FAST, "+sweep=optuna", "hydra.sweeper.n_trials=0", f"hydra.sweep.dir={sweep_dir}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=canonical_overrides(overrides), return_hydra_config=True)
    sweeper = instantiate(cfg.hydra.sweeper)
    sweeper.config = cfg
    with pytest.raises(SystemExit) as stopped:
        sweeper.sweep([])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.startswith("optuna sweeper: error: ") or "\noptuna sweeper: error: " in err
    assert "hydra.sweeper.n_trials=0: give an integer >= 1" in err and "Traceback" not in err
    assert not sweep_dir.exists()  # no study, no trial


def test_the_sweeper_is_a_hydra_plugin_on_current_optuna() -> None:
    sweepers = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)}
    assert "hydra_plugins.lora_vision_optuna.OptunaSweeper" in sweepers
    assert Version(optuna.__version__) >= Version("4")
    with pytest.raises(PackageNotFoundError):  # the old plugin (optuna<3) is not in the environment
        distribution("hydra-optuna-sweeper")
    # The package list is written out (the plugin is installed under another name); every package must be in it.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "lora_vision").rglob("__init__.py")
        if path.parent.name != "hydra_plugin"
    }
    assert set(setuptools["packages"]) == on_disk | {"hydra_plugins.lora_vision_optuna"}
    assert setuptools["package-dir"] == {"hydra_plugins.lora_vision_optuna": "lora_vision/search/hydra_plugin"}


# Any Hydra app, not only lora_vision's: a config without a `trial` key, the study in memory (the default).
TOY_APP = """
import hydra

@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    return (cfg.x - 2.0) ** 2

main()
"""


def test_any_hydra_app_can_search_with_the_sweeper(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(TOY_APP)
    (tmp_path / "config.yaml").write_text("defaults:\n  - override hydra/sweeper: optuna\n  - _self_\nx: 0.0\n")
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, "app.py", "-m", "x=interval(0, 4)", "hydra.sweeper.direction=minimize",
         "hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.seed=0", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert 0.0 <= best.best_params["x"] <= 4.0 and math.isclose(best.best_value, (best.best_params["x"] - 2) ** 2)
    assert len(list(sweep_dir.glob("*/.hydra/overrides.yaml"))) == 6


def test_a_misspelt_search_key_or_storage_is_one_message_and_no_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep_dir = tmp_path / "optuna"
    # Refused by the command line's check of its keys, before Hydra starts and so before a study exists.
    with pytest.raises(SystemExit) as stopped:
        checked_command_line(["-m", *FAST, "+sweep=optuna", "lora.rnak=choice(1,2)", f"hydra.sweep.dir={sweep_dir}"])
    assert stopped.value.code == 2 and re.search(r": error: .*lora\.rnak", capsys.readouterr().err)
    assert not sweep_dir.exists()  # no study, no trial recorded for it
    bad = multirun(sweep_dir, "+sweep=optuna", "hydra.sweeper.storage=nosuchdb://x")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "optuna sweeper: error: hydra.sweeper.storage=nosuchdb://x: cannot open it" in bad.stderr
