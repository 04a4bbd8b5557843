"""A Hydra sweeper that searches with current Optuna: trials are asked from a study, launched as Hydra jobs
through the configured launcher, and told back with the job's return value.

Written here rather than taken from `hydra-optuna-sweeper`, whose last release pins `optuna<3` (and with it an
Optuna whose SQLAlchemy storage fails under SQLAlchemy 2) and has neither pruning nor workers sharing a study.
Hydra finds it through `hydra_plugins.lora_vision_optuna` (see pyproject.toml).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from lora_vision.errors import UserError, user_errors_as_messages
from lora_vision.objective import DIRECTIONS as MODE_DIRECTIONS
from lora_vision.results import BEST_FILE, PARETO_FILE, write_atomic
from lora_vision.search.heartbeat import beat, beating, fail_lost, interrupted, rerun, running
from lora_vision.search.seeding import SEED_ATTR, TrialSeededSampler, trial_seed
from lora_vision.search.space import as_override, parse_search_space
from lora_vision.search.storage import claim_lock, open_storage

log = logging.getLogger(__name__)

# The config key through which each job learns its trial number (conf/train.yaml `trial`).
TRIAL_KEY = "trial"
# The user attribute that marks a trial a worker started over the budget and never ran (see `claim`).
SURPLUS_ATTR = "over_budget"
# Seconds between a waiting worker's looks at the study: it ends soon after the last trial does, and a look is one
# read of the storage.
WAIT_POLL_S = 2.0
# How the sweeper names itself in an error message.
PROG = "optuna sweeper"


class SweepConfigError(UserError, ValueError):
    """A sweeper setting that cannot work."""


class SweepAbortedError(UserError, RuntimeError):
    """More trials failed than `max_failure_rate` allows."""


def directions(direction: Any) -> list[str]:
    values = (
        list(direction)
        if isinstance(direction, Sequence | ListConfig) and not isinstance(direction, str)
        else [direction]
    )
    bad = [d for d in values if d not in ("maximize", "minimize")]
    if bad or not values:
        raise SweepConfigError(
            f"hydra.sweeper.direction={direction}: give maximize or minimize, or a list of them (one per objective)"
        )
    return values


def objective_values(value: Any, count: int) -> list[float] | None:
    """The job's return value as `count` finite floats; None (a failed trial) when it has none."""
    if value is None:
        return None
    values = list(value) if isinstance(value, Sequence | ListConfig) and not isinstance(value, str) else [value]
    if len(values) != count:
        raise SweepConfigError(
            f"the job returned {len(values)} value(s) but hydra.sweeper.direction has {count} objective(s); "
            "for lora_vision set objective.pareto=true (+sweep=optuna_pareto does), and the directions follow"
        )
    floats = [float(v) for v in values]
    return floats if all(math.isfinite(v) for v in floats) else None


def lowest(distribution: BaseDistribution) -> Any:
    """One value the distribution can draw: the first choice, or the lower end."""
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[0]
    return distribution.low


def counted(trial: FrozenTrial, run_again: set[int] | frozenset[int] = frozenset()) -> bool:
    """Trials that use up the study's budget: every trial but those queued and not yet started, those a worker
    started over the budget and never ran, and those that did not finish and are run again (`run_again`, their
    numbers: lora_vision.search.heartbeat)."""
    return (
        trial.state != TrialState.WAITING
        and SURPLUS_ATTR not in trial.user_attrs
        and not (trial.state == TrialState.FAIL and trial.number in run_again)
    )


def started(study: optuna.Study, below: int | None = None) -> int:
    """How many trials of the study use up its budget; with `below`, only those numbered below it."""
    trials = study.get_trials(deepcopy=False)
    again = rerun(trials)
    return sum(counted(t, again) for t in trials if below is None or t.number < below)


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """Draw one parameter of a started trial, through the public suggest API."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    low, high, step, log_scale = distribution.low, distribution.high, distribution.step, distribution.log
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, low, high, step=step, log=log_scale)
    return trial.suggest_float(name, low, high, step=step, log=log_scale)


def front_entry(trial: FrozenTrial) -> dict[str, Any]:
    """One trial of a Pareto front as the results file lists it."""
    return {
        "trial": trial.number,
        "values": trial.values,
        "params": trial.params,
        "trial_seed": trial.user_attrs.get(SEED_ATTR),
    }


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: DictConfig,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        pruner: DictConfig | None = None,
        objective: str | None = None,
        heartbeat_interval: float = 60.0,
        grace_period: float = 300.0,
    ) -> None:
        # The sampler and pruner arrive as configs (`_recursive_: false`): the sweeper builds the sampler once per
        # trial, with that trial's seed (lora_vision.search.seeding).
        self.sampler = sampler
        self.pruner = pruner
        self.objective = objective
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = params
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        # How many running trials of other workers this worker last said it waits for.
        self.waiting_for = 0
        self.job_idx = 0

    @property
    def sampler_name(self) -> str:
        return str(self.sampler.get("_target_", "sampler")).rsplit(".", 1)[-1]

    @property
    def seed(self) -> Any:
        """The sampler's configured seed (checked by `check`); None for a sampler without one."""
        return self.sampler.get("seed")

    def check(self) -> None:
        """Every setting that cannot work, refused before any trial runs."""
        self.directions = self.study_directions()
        for key, value in (("n_trials", self.n_trials), ("n_jobs", self.n_jobs)):
            if not isinstance(value, int) or value < 1:
                raise SweepConfigError(f"hydra.sweeper.{key}={value}: give an integer >= 1")
        if not 0 < self.heartbeat_interval < self.grace_period:
            raise SweepConfigError(
                f"hydra.sweeper.heartbeat_interval={self.heartbeat_interval}, hydra.sweeper.grace_period="
                f"{self.grace_period}: give 0 < heartbeat_interval < grace_period (seconds; a trial whose worker "
                "has not beaten for grace_period is run again)"
            )
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise SweepConfigError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: give a fraction in [0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise SweepConfigError(
                f"hydra.sweeper.sampler.seed={self.seed}: give an integer >= 0, or null for an unseeded search"
            )
        if self.pruner is not None and self.storage is None:
            raise SweepConfigError(
                "hydra.sweeper.pruner needs hydra.sweeper.storage: each trial reports its accuracy to the study from "
                "its own job, so the study must live in a database or journal file, not in memory"
            )
        if self.pruner is not None and len(self.directions) > 1:
            raise SweepConfigError(
                "hydra.sweeper.pruner works on one objective; Optuna cannot prune a multi-objective study "
                "(leave hydra/sweeper/pruner unset)"
            )

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)
        # An app with a `trial` key (lora_vision's) learns its trial number; any other Hydra app runs without it.
        self.numbered = TRIAL_KEY in config

    def study_directions(self) -> list[str]:
        """The study's directions: those of the app's objective (lora_vision's `objective.mode`, plus `minimize`
        for the parameters with `objective.pareto`) unless `direction` is set, which must then agree with them; for
        an app without an objective, `direction` or `maximize`.

        One definition of the objective: a run that selects its epoch by the lowest loss must not be searched for
        the highest.
        """
        mode = OmegaConf.select(self.config, "objective.mode")
        if mode not in MODE_DIRECTIONS:
            return directions("maximize" if self.direction is None else self.direction)
        pareto = bool(OmegaConf.select(self.config, "objective.pareto", default=False))
        wanted = [MODE_DIRECTIONS[mode], *(["minimize"] if pareto else [])]
        if self.direction is not None and directions(self.direction) != wanted:
            raise SweepConfigError(
                f"hydra.sweeper.direction={self.direction} disagrees with objective.mode={mode} "
                f"(objective.pareto={str(pareto).lower()}), which asks for {wanted}: leave hydra.sweeper.direction "
                "unset, it follows the objective"
            )
        return wanted

    def job_overrides(self, fixed: list[str], params: dict[str, Any], number: int) -> list[str]:
        numbered = [f"{TRIAL_KEY}={number}"] if self.numbered else []
        return [*fixed, *(as_override(key, value) for key, value in params.items()), *numbered]

    def check_composes(self, fixed: list[str], space: dict[str, BaseDistribution]) -> None:
        """Compose one job's config from the lowest value of each parameter, so that a misspelt key in the search
        space or on the command line is refused before the study records a trial for it."""
        example = {key: lowest(distribution) for key, distribution in space.items()}
        try:
            self.hydra_context.config_loader.load_sweep_config(self.config, self.job_overrides(fixed, example, 0))
        except (HydraException, OmegaConfBaseException) as err:
            raise SweepConfigError(f"a trial's config does not compose: {err}".replace("\n", " ")) from err

    def build_sampler(self) -> optuna.samplers.BaseSampler:
        """The configured sampler; when seeded, built again for each trial with the trial's own seed."""
        if self.seed is None:
            return instantiate(self.sampler)
        return TrialSeededSampler(lambda seed: instantiate(self.sampler, seed=seed), self.seed)

    def create_study(self) -> optuna.Study:
        study = optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(self.storage),
            sampler=self.build_sampler(),
            # Optuna's default when given none is a median pruner; only a chosen pruner may stop trials.
            pruner=instantiate(self.pruner) if self.pruner is not None else optuna.pruners.NopPruner(),
            directions=self.directions,
            load_if_exists=True,
        )
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in self.directions]:
            raise SweepConfigError(
                f"study {study.study_name!r} in {self.storage} was created with other directions; pick another "
                "hydra.sweeper.study_name for a different objective"
            )
        return study

    def sweep(self, arguments: list[str]) -> None:
        # A bad setting is a message, not a traceback (lora_vision.errors); HYDRA_FULL_ERROR=1 shows the trace.
        with user_errors_as_messages(PROG):
            self.check()
            self.search(arguments)

    def search(self, arguments: list[str]) -> None:
        space_file = [f"{key}={value}" for key, value in (self.params or {}).items()]
        space, fixed = parse_search_space([*space_file, *arguments])
        fixed_overrides = [f"{key}={value}" for key, value in fixed.items()]
        self.check_composes(fixed_overrides, space)
        study = self.create_study()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "study %s (%s, %s): %d of %d trials already started; sampler %s, %s; pruner %s",
            study.study_name,
            self.storage or "in memory",
            "/".join(self.directions),
            started(study),
            self.n_trials,
            self.sampler_name,
            "unseeded" if self.seed is None else f"seed {self.seed} (trial n draws with a seed made of it and n)",
            "none" if self.pruner is None else type(study.pruner).__name__,
        )
        launched = failed = 0
        while True:
            trials: list[optuna.Trial] = []
            while len(trials) < self.n_jobs and (trial := self.claim(study, space)) is not None:
                trials.append(trial)
            if not trials:
                if not self.wait_for_others(study):
                    break
                continue
            overrides = [self.job_overrides(fixed_overrides, t.params, t.number) for t in trials]
            try:
                with beating(trials, self.heartbeat_interval) if self.storage else contextlib.nullcontext():
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException as err:
                # Ctrl-C, or SIGTERM (a cluster's pre-emption or time limit) during the batch: its trials did not
                # finish, and run again in a continued search or another worker.
                if self.storage:
                    interrupted(study, trials, f"its worker was stopped ({type(err).__name__})")
                else:
                    for trial in trials:
                        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                raise
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                failed += not self.tell(study, trial.number, ret)
            launched += len(trials)
            if failed / launched > self.max_failure_rate:
                raise SweepAbortedError(
                    f"{failed} of {launched} trials failed, more than hydra.sweeper.max_failure_rate="
                    f"{self.max_failure_rate}; the failed runs' results.json say why"
                )
        self.write_results(study)

    def wait_for_others(self, study: optuna.Study) -> bool:
        """With the budget spent and trials still running in other workers: wait a moment and say so (True), since
        a trial whose worker is lost runs again here. False when no trial is running."""
        if not self.storage or not (count := running(study)):
            return False
        if count != self.waiting_for:
            self.waiting_for = count
            log.info(
                "the study's trials are all started; %d still running elsewhere: waiting for them (one whose worker "
                "stops beating for %s s runs again here)",
                count,
                self.grace_period,
            )
        time.sleep(min(self.heartbeat_interval, WAIT_POLL_S))
        return True

    def claim(self, study: optuna.Study, space: dict[str, BaseDistribution]) -> optuna.Trial | None:
        """Start one trial of the study and draw its parameters; None once the study's budget is spent.

        Workers sharing a study must not both take its last free place. For a study in a file (SQLite, journal),
        counting and starting happen under a lock that every worker takes. Without one (a database server, or a
        lock broken as stale), the trial's number decides, as the storage hands numbers out one at a time: a
        trial runs only when fewer than `n_trials` counted trials are numbered below it. A lower trial that is
        still to be marked is counted, which can only hold back a trial that is over the budget anyway: the
        lowest trial marked surplus saw `n_trials` counted ones below it, and every higher trial sees them too. A
        surplus trial draws no parameters, is marked, told as failed, and no longer counts.
        """
        with claim_lock(self.storage):
            if self.storage:
                fail_lost(study, self.grace_period)
            if started(study) >= self.n_trials:
                return None
            trial = study.ask()
            if self.storage:
                beat(trial)
        if started(study, below=trial.number) >= self.n_trials:
            trial.set_user_attr(SURPLUS_ATTR, f"started over hydra.sweeper.n_trials={self.n_trials}; not run")
            study.tell(trial, state=TrialState.FAIL)
            return None
        if self.seed is not None:
            trial.set_user_attr(SEED_ATTR, trial_seed(self.seed, trial.number))
        for name, distribution in space.items():
            suggest(trial, name, distribution)
        return trial

    def tell(self, study: optuna.Study, number: int, ret: JobReturn) -> bool:
        """Tell one finished job to the study; False when it failed. A job that pruned itself has told already."""
        try:
            values = objective_values(ret.return_value, len(self.directions))
        except SweepConfigError:
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            raise
        except Exception as err:
            # JobReturn.return_value re-raises what ended the job.
            log.error("trial %d failed: %s: %s", number, type(err).__name__, err)
            values = None
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        frozen = study.tell(number, values, state=state, skip_if_finished=True)
        return frozen.state != TrialState.FAIL

    def write_results(self, study: optuna.Study) -> None:
        """The best trial (`optimization_results.yaml`) or, with several objectives, the Pareto front
        (`pareto_front.yaml`), in the sweep directory, with what the values are (`objective`, when configured) and
        how the trials were drawn (`sampler`, `seed`; each trial's own seed is its `trial_seed`)."""
        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            log.warning("no trial of study %s completed; nothing to report as best", study.study_name)
            return
        described = {"objective": self.objective} if self.objective is not None else {}
        drawn = {"sampler": self.sampler_name, "seed": self.seed}
        if len(self.directions) == 1:
            best = study.best_trial
            content = {
                "name": "optuna",
                **described,
                "best_value": best.value,
                "best_params": best.params,
                "trial": best.number,
                "trial_seed": best.user_attrs.get(SEED_ATTR),
                **drawn,
            }
            path = BEST_FILE
        else:
            front = sorted(study.best_trials, key=lambda t: t.number)
            content = {
                "name": "optuna",
                **described,
                "directions": self.directions,
                "pareto_front": [front_entry(t) for t in front],
                **drawn,
            }
            path = PARETO_FILE
        written = write_atomic(self.sweep_dir / path, OmegaConf.to_yaml(OmegaConf.create(content)))
        log.info("search results: %s", written)
