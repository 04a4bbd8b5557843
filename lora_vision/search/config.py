"""The Optuna sweeper's settings, as Hydra structured configs: `hydra/sweeper=optuna` with the option groups
`hydra/sweeper/sampler` (tpe, random, nsgaii) and `hydra/sweeper/pruner` (median, successive_halving, hyperband;
none by default).

Registered in Hydra's ConfigStore when Hydra loads its plugins, so any Hydra app can use them; lora_vision's own
settings for a search (the space, the storage in the sweep directory) are in `conf/sweep/optuna.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SWEEPER_TARGET = "hydra_plugins.lora_vision_optuna.OptunaSweeper"


@dataclass
class TPESamplerConf:
    """Tree-structured Parzen estimator; handles one or several objectives."""

    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    multivariate: bool = False


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class NSGAIISamplerConf:
    """The genetic algorithm of NSGA-II, for several objectives."""

    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50


@dataclass
class MedianPrunerConf:
    """Stop a trial whose accuracy after an epoch is below the median of earlier trials after the same epoch."""

    _target_: str = "optuna.pruners.MedianPruner"
    # Trials that run to the end before any is pruned, and epochs before a trial can be pruned.
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    # In epochs: the fewest a trial trains before it can be stopped, and the most (the run's max_epochs).
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


@dataclass
class OptunaSweeperConf:
    """One Optuna study, searched by launching each trial as a Hydra job.

    `n_trials` counts the whole study: a rerun of the same command (same storage and study name) runs only what
    is left, and workers that share a storage together run `n_trials`.
    """

    _target_: str = SWEEPER_TARGET
    # The sweeper builds the sampler and pruner itself: the sampler once per trial, seeded by the trial's number.
    _recursive_: bool = False
    # `_self_` first, so the chosen options replace the fields below. No pruner unless one is chosen:
    # hydra/sweeper/pruner=median (a group declared null takes an option without +).
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": None}])
    # A sampler's `seed` seeds the search: trial n samples with a seed derived from it and n
    # (lora_vision.search.seeding), so a continued search and each worker sharing the study draw new points.
    sampler: Any = MISSING
    # null, or one of optuna.pruners; needs a storage every job can open (a trial reports from its own process).
    pruner: Any = None
    # `maximize` or `minimize`, or one per objective for a multi-objective study (e.g. [maximize, minimize]).
    # null: from the app's `objective.mode` (lora_vision's; with `objective.pareto`, [that, minimize]), or maximize
    # for an app without one.
    direction: Any = None
    study_name: str | None = None
    # A database URL (sqlite:///path/optuna.db, postgresql://...), a file path (an Optuna journal file, for
    # workers on a shared file system), or null (in memory: no resume, no pruning, no second worker).
    storage: str | None = None
    n_trials: int = 20
    # Trials proposed at once and launched together (a parallel launcher runs them at the same time).
    n_jobs: int = 1
    # Stop the search when more than this share of this sweep's trials has failed.
    max_failure_rate: float = 1.0
    # Seconds: with a storage, each worker marks its running trials alive this often, and a trial not marked for
    # grace_period (its worker killed outright, its node lost) is failed and run again with the same parameters by
    # the next worker to claim a trial; workers with nothing left to claim wait for the running trials to end.
    heartbeat_interval: float = 60.0
    grace_period: float = 300.0
    # The search space: key -> a sweep in Hydra's override syntax, e.g. `tag(log, interval(1e-4, 1e-2))`.
    params: dict[str, str] | None = None
    # What the job returns, in words (the metric and its unit), written as `objective` beside the values in the
    # results file.
    objective: str | None = None


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="lora_vision")
    for name, node in {"tpe": TPESamplerConf, "random": RandomSamplerConf, "nsgaii": NSGAIISamplerConf}.items():
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="lora_vision")
    pruners = {
        "median": MedianPrunerConf,
        "successive_halving": SuccessiveHalvingPrunerConf,
        "hyperband": HyperbandPrunerConf,
    }
    for name, node in pruners.items():
        store.store(group="hydra/sweeper/pruner", name=name, node=node, provider="lora_vision")
