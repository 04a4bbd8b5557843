"""One objective for the checkpoint callback, the tested epoch, the pruner, results.json and the sweeper."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch

from lora_vision.config_checks import ConfigError
from lora_vision.objective import Objective, ObjectiveError
from lora_vision.search.pruning import TrialPruning
from lora_vision.train import check_run, run
from tests.helpers import composed

FAST = ("+exp=smoke", "data.num_samples=64", "data.num_test_samples=32")


def test_selection_follows_mode_and_select() -> None:
    history = {0: 0.5, 1: 0.7, 2: 0.7, 3: 0.6}
    assert Objective().selected(history) == (1, 0.7)  # ties go to the earlier epoch, as ModelCheckpoint's
    assert Objective(select="last").selected(history) == (3, 0.6)
    assert Objective(metric="val/loss", mode="min").selected(history) == (0, 0.5)
    assert Objective().selected({0: math.nan}) is None
    assert Objective(select="last").selected({0: 0.5, 1: math.nan}) is None


def test_the_penalty_always_costs_in_the_metric_s_own_direction() -> None:
    assert Objective(param_penalty=0.01).score(0.8, 10_000) == pytest.approx(0.76)
    assert Objective(metric="val/loss", mode="min", param_penalty=0.01).score(0.8, 10_000) == pytest.approx(0.84)
    assert Objective(pareto=True).sweep_value(0.8, 10_000) == [0.8, 10_000.0]
    assert Objective(metric="val/loss", mode="min", pareto=True).directions() == ["minimize", "minimize"]
    assert Objective().sweep_value(None, 10) is None


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"metric": "train/loss"}, "objective.metric='train/loss'"),
        ({"mode": "maximize"}, "objective.mode='maximize': give one of max, min"),
        ({"select": "first"}, "objective.select='first': give one of best, last"),
        ({"param_penalty": "0.1"}, "objective.param_penalty='0.1'"),
        ({"metrc": "val/acc1"}, "objective has no key 'metrc'"),
    ],
)
def test_bad_objective_settings_name_the_key_and_the_valid_values(settings: dict, named: str) -> None:
    with pytest.raises(ObjectiveError, match=re.escape(named)):
        Objective.from_config(settings)


def test_the_checkpoint_and_early_stopping_callbacks_monitor_the_objective() -> None:
    with composed("objective.metric=val/loss", "objective.mode=min", "callbacks=[default,early_stopping]") as cfg:
        for name in ("model_checkpoint", "early_stopping"):
            assert (cfg.callbacks[name].monitor, cfg.callbacks[name].mode) == ("val/loss", "min")


def test_a_callback_ranking_by_another_metric_is_refused_before_training(tmp_path: Path) -> None:
    refused = pytest.raises(
        ConfigError, match=r"callbacks\.model_checkpoint\.monitor=val/loss differs from the objective"
    )
    with composed(*FAST, "callbacks.model_checkpoint.monitor=val/loss", output_dir=tmp_path) as cfg, refused:
        check_run(cfg)


def train(run_dir: Path, *overrides: str) -> dict:
    with composed(*overrides, output_dir=run_dir) as cfg:
        record = run(cfg)
    assert record == json.loads((run_dir / "results.json").read_text())
    return record


def val_history(run_dir: Path, metric: str) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["epoch"]): float(row[metric]) for row in csv.DictReader(f) if row.get(metric)}


def test_a_loss_objective_selects_the_lowest_loss_epoch_and_is_not_maximised(tmp_path: Path) -> None:
    run_dir = tmp_path / "loss"
    args = (*FAST, "trainer.max_epochs=3", "objective.metric=val/loss", "objective.mode=min")
    record = train(run_dir, *args, "objective.param_penalty=0.01")
    losses = val_history(run_dir, "val/loss")
    best_epoch = min(losses, key=lambda epoch: (losses[epoch], epoch))
    assert record["objective_epoch"] == best_epoch
    assert record["objective_metric_value"] == pytest.approx(losses[best_epoch])
    assert record["objective"] == pytest.approx(losses[best_epoch] + 0.01 * math.log10(record["trainable_params"]))
    tested = torch.load(record["best_checkpoint"], map_location="cpu", weights_only=True)
    assert tested["epoch"] == best_epoch
    assert record["best_val_acc1"] == pytest.approx(max(val_history(run_dir, "val/acc1").values()))


def test_testing_the_last_epoch_gives_an_objective_and_keeps_no_best_checkpoint(tmp_path: Path) -> None:
    # What the VTAB-1k experiments do; with the checkpoint callback's monitor switched off instead, as they once
    # did, there was no best score, and every search trial failed.
    run_dir = tmp_path / "last"
    record = train(run_dir, *FAST, "objective.select=last")
    accuracy = val_history(run_dir, "val/acc1")
    assert record["objective_epoch"] == max(accuracy) == record["max_epochs"] - 1
    assert record["objective"] == pytest.approx(accuracy[max(accuracy)])
    assert record["best_checkpoint"] is None and record["tested"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]


def test_the_pruner_is_told_the_score_the_search_optimises(tmp_path: Path) -> None:
    # A small adapter the penalised objective ranks first must not look worse to the pruner.
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trial = study.ask()
    objective = Objective(param_penalty=0.01)
    pruning = TrialPruning(study, trial.number, objective, trainable_params=1_000)
    for epoch, accuracy in enumerate([0.5, 0.6]):
        trainer = SimpleNamespace(
            sanity_checking=False,
            callback_metrics={"val/acc1": torch.tensor(accuracy)},
            global_rank=0,
            current_epoch=epoch,
            strategy=SimpleNamespace(broadcast=lambda value: value),
            should_stop=False,
        )
        pruning.on_validation_epoch_end(trainer, None)
    reported = study.trials[0].intermediate_values
    assert reported == pytest.approx({0: 0.5 - 0.03, 1: 0.6 - 0.03})
