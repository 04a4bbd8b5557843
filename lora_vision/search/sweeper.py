"""A Hydra sweeper that searches with current Optuna: trials are asked from a study, launched as Hydra jobs
through the configured launcher, and told back with the job's return value.

Written here rather than taken from `hydra-optuna-sweeper`, whose last release pins `optuna<3` (and with it an
Optuna whose SQLAlchemy storage fails under SQLAlchemy 2) and has neither pruning nor workers sharing a study.
Hydra finds it through `hydra_plugins.lora_vision_optuna` (see pyproject.toml).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from lora_vision.errors import UserError, user_errors_as_messages
from lora_vision.results import PARETO_FILE, write_atomic
from lora_vision.search.space import as_override, parse_search_space
from lora_vision.search.storage import open_storage

log = logging.getLogger(__name__)

# The config key through which each job learns its trial number (conf/train.yaml `trial`).
TRIAL_KEY = "trial"
BEST_FILE = "optimization_results.yaml"
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
            "for lora_vision set objective.pareto=true with two directions (+sweep=optuna_pareto does both)"
        )
    floats = [float(v) for v in values]
    return floats if all(math.isfinite(v) for v in floats) else None


def lowest(distribution: BaseDistribution) -> Any:
    """One value the distribution can draw: the first choice, or the lower end."""
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[0]
    return distribution.low


def counted(trial: FrozenTrial) -> bool:
    """Trials that use up the study's budget: every trial but those queued and not yet started."""
    return trial.state != TrialState.WAITING


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: optuna.samplers.BaseSampler,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        # Hydra instantiates the sampler and pruner configs (their `_target_`) before it builds the sweeper.
        self.sampler = sampler
        self.pruner = pruner
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = params
        self.job_idx = 0

    def check(self) -> None:
        """Every setting that cannot work, refused before any trial runs."""
        self.directions = directions(self.direction)
        for key, value in (("n_trials", self.n_trials), ("n_jobs", self.n_jobs)):
            if not isinstance(value, int) or value < 1:
                raise SweepConfigError(f"hydra.sweeper.{key}={value}: give an integer >= 1")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise SweepConfigError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: give a fraction in [0, 1]")
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
        self.check_objective_count()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)
        # An app with a `trial` key (lora_vision's) learns its trial number; any other Hydra app runs without it.
        self.numbered = TRIAL_KEY in config

    def check_objective_count(self) -> None:
        """The app's own switch for two objectives (lora_vision's `objective.pareto`) must agree with `direction`."""
        pareto = OmegaConf.select(self.config, "objective.pareto")
        if pareto is not None and bool(pareto) != (len(self.directions) == 2):
            raise SweepConfigError(
                f"objective.pareto={pareto} with hydra.sweeper.direction={self.directions}: a two-objective search "
                "needs objective.pareto=true and two directions ([maximize, minimize]), a single-objective one "
                "neither; +sweep=optuna_pareto sets both"
            )

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

    def create_study(self) -> optuna.Study:
        study = optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(self.storage),
            sampler=self.sampler,
            pruner=self.pruner,
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
        previous = sum(counted(t) for t in study.get_trials(deepcopy=False))
        log.info(
            "study %s (%s, %s): %d of %d trials already started; sampler %s, pruner %s",
            study.study_name,
            self.storage or "in memory",
            "/".join(self.directions),
            previous,
            self.n_trials,
            type(study.sampler).__name__,
            type(study.pruner).__name__,
        )
        launched = failed = 0
        while True:
            started = sum(counted(t) for t in study.get_trials(deepcopy=False))
            batch = min(self.n_jobs, self.n_trials - started)
            if batch <= 0:
                break
            trials = [study.ask(space) for _ in range(batch)]
            overrides = [self.job_overrides(fixed_overrides, t.params, t.number) for t in trials]
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException:
                # Ctrl-C or SIGTERM during the batch: its trials will not finish here.
                for trial in trials:
                    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                raise
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                failed += not self.tell(study, trial.number, ret)
            launched += batch
            if failed / launched > self.max_failure_rate:
                raise SweepAbortedError(
                    f"{failed} of {launched} trials failed, more than hydra.sweeper.max_failure_rate="
                    f"{self.max_failure_rate}; the failed runs' results.json say why"
                )
        self.write_results(study)

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
        (`pareto_front.yaml`), in the sweep directory."""
        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            log.warning("no trial of study %s completed; nothing to report as best", study.study_name)
            return
        if len(self.directions) == 1:
            best = study.best_trial
            content = {"name": "optuna", "best_params": best.params, "best_value": best.value, "trial": best.number}
            path = BEST_FILE
        else:
            front = sorted(study.best_trials, key=lambda t: t.number)
            content = {
                "name": "optuna",
                "directions": self.directions,
                "pareto_front": [{"trial": t.number, "values": t.values, "params": t.params} for t in front],
            }
            path = PARETO_FILE
        written = write_atomic(self.sweep_dir / path, OmegaConf.to_yaml(OmegaConf.create(content)))
        log.info("search results: %s", written)
