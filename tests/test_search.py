"""The Optuna sweeper (`+sweep=optuna`, lora_vision.search): search space, failed and pruned trials, resuming a
study, two workers on one study, the two-objective Pareto front and seeded reproducibility."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import optuna
import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from packaging.version import Version

from lora_vision.report.collect import pareto_front
from lora_vision.search.space import SearchSpaceError, as_override, parse_search_space
from lora_vision.search.storage import load_study
from lora_vision.search.sweeper import SweepConfigError, directions, objective_values
from tests.helpers import FAST, launch, multirun, records

ROOT = Path(__file__).resolve().parents[1]


def study(sweep_dir: Path, name: str = "smoke", storage: str = "sqlite:///{}/optuna.db") -> optuna.Study:
    return load_study(storage.format(sweep_dir), name)


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


def test_failed_trials_are_told_as_failed_and_the_best_is_found(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    # With the sampler's fixed seed two of the three trials draw rank 999, which fails while the adapters are applied.
    trials = ("hydra.sweeper.n_trials=3", "lora.rank=choice(2,999)", "objective.param_penalty=0.01")
    done = multirun(sweep_dir, "+sweep=optuna", *trials)
    assert done.returncode == 0, done.stderr[-3000:]
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


def test_the_pruner_stops_hopeless_trials_and_a_rerun_continues_the_study(tmp_path: Path) -> None:
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

    # The same command with a larger budget continues the study: one more trial, numbered after the others, in a
    # directory of its own; the finished trials' runs are untouched.
    before = {name: (sweep_dir / name / "results.json").read_bytes() for name in found}
    again = launch(tmp_path, "-m", *PRUNED_SEARCH, "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(records(sweep_dir)) == ["0", "1", "2", "3", "4"]
    assert all((sweep_dir / name / "results.json").read_bytes() == data for name, data in before.items())
    assert len(study(sweep_dir).trials) == 5
    # With the budget spent, a rerun launches nothing.
    spent = launch(tmp_path, "-m", *PRUNED_SEARCH, "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={sweep_dir}")
    assert spent.returncode == 0 and len(study(sweep_dir).trials) == 5


# The default SQLite database, and an Optuna journal file (what workers on a network file system should use).
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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(log[-2000:] for log in logs)
    launched = [[n for n in range(6) if f" trial={n}\n" in log] for log in logs]
    assert all(launched), "a worker ran no trial"  # both pulled from the study
    assert sorted(launched[0] + launched[1]) == list(range(6))  # every trial once, none twice
    assert {name: r["trial"] for name, r in records(sweep_dir).items()} == {str(n): n for n in range(6)}
    assert [t.state for t in study(sweep_dir, storage=storage).trials] == [TrialState.COMPLETE] * 6


PARETO_SEARCH = (
    "+sweep=optuna_pareto",
    "hydra.sweeper.n_trials=5",
    "hydra.sweeper.sampler.n_startup_trials=2",
    "lora.rank=choice(1,2,4,8)",
    "lora.targets=choice(qv,all_linear)",
)


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
        (("+sweep=optuna", "objective.pareto=true"), "objective.pareto=True with hydra.sweeper.direction"),
        (
            ("+sweep=optuna", "hydra/sweeper/pruner=median", "hydra.sweeper.storage=null"),
            "hydra.sweeper.pruner needs hydra.sweeper.storage",
        ),
        (("+sweep=optuna_pareto", "hydra/sweeper/pruner=median"), "Optuna cannot prune a multi-objective study"),
        (("+sweep=optuna", "hydra.sweeper.n_trials=0"), "hydra.sweeper.n_trials=0: give an integer >= 1"),
    ],
)
def test_a_search_that_cannot_work_is_one_message_before_any_trial(
    tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    sweep_dir = tmp_path / "optuna"
    done = multirun(sweep_dir, *overrides)
    assert done.returncode == 2
    assert done.stderr.startswith("optuna sweeper: error: ") or "\noptuna sweeper: error: " in done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not list(sweep_dir.glob("*/results.json"))


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


def test_a_misspelt_search_key_or_storage_is_one_message_and_no_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    done = multirun(sweep_dir, "+sweep=optuna", "lora.rnak=choice(1,2)")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "optuna sweeper: error: a trial's config does not compose: Could not override 'lora.rnak'" in done.stderr
    assert not sweep_dir.exists()  # no study, no trial recorded for it
    bad = multirun(sweep_dir, "+sweep=optuna", "hydra.sweeper.storage=nosuchdb://x")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "optuna sweeper: error: hydra.sweeper.storage=nosuchdb://x: cannot open it" in bad.stderr
