"""A seed for each trial: the configured sampler, built afresh for every trial with a seed derived from the
configured one and the trial's number.

One seed for a whole launch would restart the sampler's random stream at every launch: a continued search and
every worker sharing a study would propose the points the first launch already proposed (TPE draws its first
trials at random). Trial numbers are unique within a study (the storage hands them out), so seeding by number
gives every trial a stream of its own, whichever launch or worker asks for it, and the same trial number the same
stream when a study is run again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

# Each trial's seed, stored with the trial (the dashboard shows it) so that its draw can be traced.
SEED_ATTR = "sampler_seed"


def trial_seed(seed: int, number: int) -> int:
    """The seed trial `number` samples with: numpy's SeedSequence of (seed, number), 32 bits as samplers take."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """The sampler `build(seed)` makes, made again before each trial with `trial_seed(seed, trial.number)`.

    Samplers keep what they learn in the study, not in the object (TPE and NSGA-II read the finished trials on
    every call), so a new object per trial loses nothing but the random state this replaces.
    """

    def __init__(self, build: Callable[[int], BaseSampler], seed: int) -> None:
        self.build = build
        self.seed = seed
        self.sampler = build(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler = self.build(trial_seed(self.seed, trial.number))
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
