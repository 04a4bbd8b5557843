"""Trials whose worker is lost: each worker beats for the trials it runs, and a trial whose beats stop is failed
and queued to run again with the same parameters.

Optuna's own heartbeat (`heartbeat_interval` on `RDBStorage`) exists for database storages only; the journal
file, the storage SLURM workers on a shared file system should use, has none. The beat here is a user attribute
of the trial (its worker's clock, seconds since the epoch), so it works on every storage the sweeper opens, and
the dashboard shows it. A worker killed outright (SIGKILL, a node lost, `scancel --signal=KILL`) stops beating;
after `grace_period` seconds the next worker to claim a trial fails it and queues it again. A worker interrupted by
a signal it can catch (Ctrl-C, SLURM's SIGTERM at preemption or at the time limit) queues its trials again at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

# The worker's last beat for a running trial.
BEAT_ATTR = "heartbeat"
# Set on the trial that runs a lost one again: the lost trial's number. A failed trial that another trial runs
# again no longer counts against the study's budget.
RERUN_ATTR = "rerun_of"
# Set on a trial its worker gave up when interrupted: why.
INTERRUPTED_ATTR = "interrupted"


def beat(trial: optuna.Trial) -> None:
    trial.set_user_attr(BEAT_ATTR, time.time())


@contextlib.contextmanager
def beating(trials: list[optuna.Trial], interval_s: float) -> Iterator[None]:
    """Beat for `trials` every `interval_s` seconds, in a thread, while the block runs (the trials' jobs)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            for trial in trials:
                try:
                    beat(trial)
                except UpdateFinishedTrialError:
                    pass  # a job that pruned itself has told its trial: it needs no more beats
                except Exception as err:  # a storage hiccup must not end the worker: the next beat may pass
                    log.warning("heartbeat of trial %d not recorded: %s", trial.number, err)

    thread = threading.Thread(target=run, name="trial-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def last_beat(trial: FrozenTrial) -> float:
    """When the trial's worker last showed it was alive: its last beat, or when it started the trial."""
    beaten = trial.user_attrs.get(BEAT_ATTR)
    if isinstance(beaten, int | float):
        return float(beaten)
    started = trial.datetime_start
    return started.timestamp() if started is not None else time.time()


def run_again(study: optuna.Study, number: int, params: dict[str, Any], reason: str) -> None:
    """Fail a running trial that will not finish and queue a trial with its parameters, which runs it again.

    Failed first, then queued: a worker lost between the two leaves a failed trial that counts against the budget,
    never one that runs twice.
    """
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    study.enqueue_trial(params, user_attrs={RERUN_ATTR: number}, skip_if_exists=False)
    log.warning("trial %d: %s; queued to run again with the same parameters", number, reason)


def interrupted(study: optuna.Study, trials: list[optuna.Trial], reason: str) -> None:
    """Run again the trials of a worker that is being stopped (their jobs did not finish)."""
    for trial in trials:
        trial.set_user_attr(INTERRUPTED_ATTR, reason)
        run_again(study, trial.number, trial.params, reason)


def fail_lost(study: optuna.Study, grace_period_s: float) -> int:
    """Run again every running trial whose worker has not beaten for `grace_period_s` seconds; how many. Called
    with the study's claim lock held where it has one, so that two workers do not both queue the same trial (on a
    database server both may: the later copy is then over the budget and not run)."""
    now = time.time()
    lost = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if now - last_beat(t) > grace_period_s
    ]
    for trial in lost:
        silent = now - last_beat(trial)
        run_again(study, trial.number, trial.params, f"its worker was lost: no heartbeat for {silent:.0f} s")
    return len(lost)


def rerun(trials: list[FrozenTrial]) -> set[int]:
    """The numbers of the failed trials that other trials run again."""
    return {t.user_attrs[RERUN_ATTR] for t in trials if RERUN_ATTR in t.user_attrs}


def running(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
