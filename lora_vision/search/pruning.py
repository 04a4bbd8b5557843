"""Pruning from inside a trial: after each validation epoch the run reports its objective's score to the study
(the same score, penalty included, that the search is told at the end: `lora_vision.objective`), and stops when
the study's pruner says the trial cannot catch up.

The job, not the sweeper, tells the study that the trial was pruned (the sweeper then skips it), because only the
job knows; the run's `results.json` says `pruned` with the epoch.
"""

from __future__ import annotations

import logging

import lightning as L
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.trial import TrialState

from lora_vision.objective import Objective
from lora_vision.search.storage import load_study

log = logging.getLogger(__name__)


class TrialPruning(L.Callback):
    """Report the objective's score after each validation epoch (step = epoch) and stop training when the trial is
    pruned. The score counts the parameter penalty, so a pruner never stops a small adapter that the search's own
    objective would rank first."""

    def __init__(self, study: optuna.Study, number: int, objective: Objective, trainable_params: int) -> None:
        self.study = study
        self.number = number
        self.objective = objective
        self.trainable_params = trainable_params
        self.pruned_at_epoch: int | None = None
        # Optuna reports through a Trial bound to the study; its public constructor takes the storage's trial id.
        trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == number)
        self.trial = optuna.Trial(study, trial_id)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric = self.objective.metric
        if trainer.sanity_checking or metric not in trainer.callback_metrics:
            return
        # Rank zero reports (the study stores one value per step) and decides; every rank has to stop.
        if trainer.global_rank == 0:
            epoch = trainer.current_epoch
            score = self.objective.score(float(trainer.callback_metrics[metric]), self.trainable_params)
            self.trial.report(score, step=epoch)
            if self.trial.should_prune():
                self.pruned_at_epoch = epoch
                self.study.tell(self.number, state=TrialState.PRUNED)
                log.info("trial %d pruned after epoch %d by %s", self.number, epoch, type(self.study.pruner).__name__)
        pruned = trainer.strategy.broadcast(self.pruned_at_epoch is not None)
        trainer.should_stop = trainer.should_stop or pruned


def trial_pruning(trial: int | None, objective: Objective, trainable_params: int) -> TrialPruning | None:
    """The pruning callback for trial number `trial` of the running Optuna sweep, when its study has a pruner."""
    if trial is None or not HydraConfig.initialized():
        return None
    sweeper: DictConfig = HydraConfig.get().sweeper
    if sweeper.get("pruner") is None or sweeper.get("storage") is None:
        return None
    study = load_study(sweeper.storage, sweeper.study_name, pruner=instantiate(sweeper.pruner))
    return TrialPruning(study, trial, objective, trainable_params)
