"""Training entry point: `python -m lora_vision.train +exp=vit_r8` (Hydra; see conf/train.yaml).

One run: check the config, build the backbone, apply the method (LoRA or a baseline), fit, test the checkpoint
the objective selects, and write `results.json` into the run directory. The returned objective (the selected
epoch's validation metric, optionally penalised by the trainable parameter count; `lora_vision.objective`) is what
Hydra sweepers such as Optuna optimise. Run again in the same directory, a finished run is reported and keeps its
files, an unfinished one resumes (`lora_vision.rerun`).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lora_vision.adapters import ADAPTER_DIR, ADAPTER_TENSORS, save_adapter, weights_fingerprint
from lora_vision.builders import (
    base_source,
    build_backbone,
    build_datamodule,
    build_method,
    build_module,
    build_trainer,
    check_num_classes,
    instantiate_all,
    use_allocated_cpus,
)
from lora_vision.callbacks import FiniteLoss, TrainThroughput, ended_by
from lora_vision.cli import checked_command_line
from lora_vision.composition import check_data_keys
from lora_vision.config_checks import (
    ConfigError,
    check_accelerator,
    check_appended_keys,
    check_config,
    warn_slow_options,
)
from lora_vision.errors import MissingInputError, UserError, exit_with_message, full_traceback_requested
from lora_vision.models import checked_checkpoint, model_data_config, model_label, route_hub_logs_to_root
from lora_vision.module import Classifier
from lora_vision.multitask.config import is_multitask
from lora_vision.multitask.run import run_multitask
from lora_vision.objective import Objective, ValidationHistory
from lora_vision.performance import apply_performance_options
from lora_vision.prefix_cache import PREFIX_CACHE_KEYS, SuffixClassifier, serve_run_prefix_cache
from lora_vision.preflight import check_output_dir
from lora_vision.quiet import quiet_third_party
from lora_vision.rerun import (
    check_rerun_choice,
    check_same_run,
    describe_finished,
    finished,
    keep_record,
    previous_record,
    set_aside,
)
from lora_vision.results import PROJECT_ROOT, RESULTS_FILE, finite_or_none, git_state, versions, write_json_atomic
from lora_vision.resume import (
    ResumeCheckpoint,
    best_checkpoint_on_disk,
    resume_point,
)
from lora_vision.search.pruning import TrialPruning, trial_pruning

log = logging.getLogger(__name__)

# What a shell reports for a process ended by SIGTERM (128 + 15).
SIGTERM_EXIT_STATUS = 143


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_launch_in_multirun(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Refuse, inside a Hydra multirun, a strategy that starts its other processes by re-running the command line.

    Lightning's `ddp` re-runs `sys.argv` once per further device; inside a multirun that copy would run the whole
    sweep again, in a sweep directory of its own (lightning-ai/pytorch-lightning#11300). Under SLURM the processes
    come from SLURM instead, and nothing is re-run.
    """
    # Lightning has no public way to ask whether a strategy re-runs the script; its launcher class tells, and that
    # launcher re-runs nothing when the cluster environment starts the processes (SLURM's srun tasks).
    environment = getattr(trainer.strategy, "cluster_environment", None)
    external = environment is not None and environment.creates_processes_externally
    relaunches = isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and not external
    relaunches = relaunches and trainer.num_devices > 1
    if relaunches and in_multirun():
        raise ConfigError(
            f"trainer.strategy={cfg.trainer.get('strategy', 'auto')} with trainer.devices={cfg.trainer.devices} "
            "re-runs the command line for each further device, which would repeat the whole sweep; run this "
            "configuration without -m, or sweep it with hydra/launcher=slurm and hydra.launcher.tasks_per_node set "
            "to the number of devices"
        )


def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """Send the resolved experiment config to every logger (W&B config, hparams.yaml, TensorBoard hparams)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    keys = ("exp_name", "seed", "model", "lora", "data", "optim", "module", "perf", "trainer")
    params = {key: resolved.get(key) for key in keys}
    for logger in loggers:
        logger.log_hyperparams(params)


@rank_zero_only
def finish_wandb(loggers: list[Logger], record: dict[str, Any]) -> None:
    """Put the run record into the W&B run summary and close the run.

    Closing matters in multirun: jobs share one process, and an open W&B run would swallow the next job's logs.
    Rank zero only: under DDP the other ranks hold a placeholder experiment without a summary.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({k: v for k, v in record.items() if not isinstance(v, dict | list)})
            logger.experiment.finish()


def run_identity(cfg: DictConfig, method: Any) -> dict[str, Any]:
    """The record fields that decide what a run trains, known from the config alone: a rerun in the same
    directory must match them (`lora_vision.rerun.check_same_run`)."""
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    return {
        "model": cfg.model.name,
        "model_kwargs": kwargs,
        "pretrained": cfg.model.pretrained,
        **method.describe(),
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        **{key: cfg.data[key] for key in ("task", "protocol") if key in cfg.data},
        "image_size": cfg.data.image_size,
        "seed": cfg.seed,
        "lr": cfg.optim.lr,
        "batch_size": cfg.data.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
    }


def base_record(cfg: DictConfig, method: Any, summary: Any, num_classes: int) -> dict[str, Any]:
    """What the run is and what it trains, known before training starts."""
    identity, model = run_identity(cfg, method), cfg.model
    return {
        "experiment": cfg.exp_name,
        **identity,
        "model_label": model_label(model.name, identity["model_kwargs"], model.pretrained, model.checkpoint),
        "num_classes": num_classes,
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "trainable_percent": summary.trainable_percent,
        "adapter_params": summary.adapter_params,
        "versions": versions(),
        **git_state(),
        "output_dir": str(cfg.paths.output_dir),
        "trial": cfg.trial,
        "status": "running",
    }


def _callback(trainer: L.Trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def tested_checkpoint(trainer: L.Trainer, objective: Objective) -> Path | None:
    """The checkpoint to test: the best one on disk for `select: best`; None (the weights in memory, those of the
    last epoch) for `select: last`, or when no checkpoint was saved (checkpointing off, fast_dev_run)."""
    checkpoint = _callback(trainer, ModelCheckpoint)
    if objective.select == "last" or checkpoint is None or not checkpoint.best_model_path:
        return None
    path = best_checkpoint_on_disk(checkpoint)
    if path is None:
        raise MissingInputError(
            f"the best checkpoint ({checkpoint.best_model_path}) and any other one are gone from {checkpoint.dirpath}: "
            "it was deleted; train again with resume=false (the earlier attempt is kept in previous-<n>/)"
        )
    return path


def fit_and_test(
    cfg: DictConfig,
    objective: Objective,
    trainer: L.Trainer,
    module: Classifier,
    datamodule: L.LightningDataModule,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Fit (from `resume_from` when given), then test the checkpoint the objective selects; return the outcome
    fields of the record.

    A trial stopped by the search's pruner is not tested: it ends `pruned`, with the last epoch it trained.
    """
    throughput = _callback(trainer, TrainThroughput)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    outcome = _callback(trainer, ValidationHistory).record(objective, module.param_summary.trainable)
    best_path = tested_checkpoint(trainer, objective)
    pruned_at = next((c.pruned_at_epoch for c in trainer.callbacks if isinstance(c, TrialPruning)), None)
    test_metrics: dict[str, Any] = {}
    if cfg.test and pruned_at is None:
        test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best_path)[0]
    return {
        **outcome,
        "test_acc1": finite_or_none(test_metrics.get("test/acc1")),
        "test_acc5": finite_or_none(test_metrics.get("test/acc5")),
        "test_loss": finite_or_none(test_metrics.get("test/loss")),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "best_checkpoint": None if best_path is None else str(best_path),
        "train_images_per_s": throughput.images_per_second,
        "peak_gpu_memory_mib": peak_gpu_memory_mib(trainer),
        "tested": bool(test_metrics),
        **({"status": "pruned", "pruned_at_epoch": pruned_at} if pruned_at is not None else {}),
    }


def peak_gpu_memory_mib(trainer: L.Trainer) -> float | None:
    """The most CUDA memory this process held for tensors during the run (MiB); None off the GPU."""
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def save_run_adapter(
    cfg: DictConfig,
    method: Any,
    module: Classifier,
    best_checkpoint: str | None,
    tested: bool,
    fingerprint: str,
    num_classes: int,
) -> dict[str, Any]:
    """Save the adapter of the best checkpoint's weights into `<run dir>/adapter/`.

    Rank zero only. When `tested`, `trainer.test(ckpt_path=best)` has already put the best weights into the
    module; otherwise they are loaded here. Returns the record fields `adapter_dir` and `adapter_bytes`.
    """
    if rank_zero_only.rank != 0:
        return {}
    if best_checkpoint and not tested:
        # Tensors and plain values only: a resumed checkpoint's callback state names this path, so it may be anyone's.
        checkpoint = torch.load(best_checkpoint, map_location="cpu", weights_only=True)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
    directory = save_adapter(
        module.model,
        Path(cfg.paths.output_dir) / ADAPTER_DIR,
        model_name=cfg.model.name,
        model_kwargs=OmegaConf.to_container(cfg.model.kwargs, resolve=True),
        num_classes=num_classes,
        method_config=method.config(),
        base_fingerprint=fingerprint,
        base_source=base_source(cfg),
        data=OmegaConf.to_container(cfg.data, resolve=True),
        extra={"experiment": cfg.exp_name},
        # Frozen BatchNorm layers update their running statistics too when they are not kept in eval mode.
        all_batchnorm_stats=not cfg.module.frozen_bn_eval,
    )
    return {"adapter_dir": str(directory), "adapter_bytes": (directory / ADAPTER_TENSORS).stat().st_size}


def check_run(cfg: DictConfig) -> Objective:
    """Every check that needs no model or data: the output directory, the values, the keys, the accelerator, the
    objective (which the checkpoint and early-stopping callbacks must rank epochs by); returns the objective."""
    check_data_keys(cfg)
    check_output_dir(cfg.paths.output_dir)
    check_config(cfg)
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        check_appended_keys(hydra_cfg.overrides.task, hydra_cfg.runtime.choices, cfg)
    check_accelerator(cfg)
    warn_slow_options(cfg)
    check_rerun_choice(cfg.rerun)
    objective = Objective.from_config(OmegaConf.to_container(cfg.objective, resolve=True))
    check_callbacks_follow(objective, cfg.get("callbacks") or {})
    return objective


def check_callbacks_follow(objective: Objective, callbacks: DictConfig | dict[str, Any]) -> None:
    """Refuse a checkpoint or early-stopping callback that ranks epochs by something else than the objective: the
    tested epoch, the pruner and the search would then disagree on what is best."""
    for name, entry in callbacks.items():
        if not isinstance(entry, DictConfig | dict) or "monitor" not in entry:
            continue
        for key, wanted in (("monitor", objective.metric), ("mode", objective.mode)):
            if entry.get(key, wanted) != wanted:
                raise ConfigError(
                    f"callbacks.{name}.{key}={entry.get(key)} differs from the objective's {wanted}: set "
                    "objective.metric and objective.mode instead, which rank epochs for the checkpoint, the "
                    "pruner and the search alike (objective.select=last tests the last epoch)"
                )


def ordered_callbacks(callbacks: list[Any], objective: Objective) -> list[Any]:
    """The run's callbacks, with `ResumeCheckpoint` after `ModelCheckpoint` (so `last.ckpt` records the best file
    of its own epoch) and without `ModelCheckpoint` when the last epoch is tested (no best file is needed)."""
    if objective.select == "last":
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
    return sorted(callbacks, key=lambda c: isinstance(c, ResumeCheckpoint))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; return the record written to `<run dir>/results.json`.

    A finished run asked again is reported (or, with `rerun=test`, tested again) and keeps its files.
    """
    started = time.perf_counter()
    objective = check_run(cfg)
    if is_multitask(cfg):
        return run_multitask(cfg, objective)
    run_dir = Path(cfg.paths.output_dir)
    method = build_method(cfg.lora)
    previous = previous_record(run_dir)
    if previous is not None and cfg.resume is not False:
        check_same_run(previous, run_identity(cfg, method), run_dir)
    if finished(previous) and cfg.resume is True and cfg.rerun == "report":
        log.info(describe_finished(previous, run_dir))
        return previous
    # The base weights file, checked once a finished run has been reported (which needs no weights), and before a
    # previous attempt is set aside and data is extracted, which can take minutes.
    if cfg.model.checkpoint is not None:
        checked_checkpoint(cfg.model.checkpoint)
    # Testing a finished run again: its record is kept beside the new one, and left in place should the test fail.
    retest = finished(previous) and cfg.resume is not False
    if rank_zero_only.rank == 0:
        if cfg.resume is False:
            set_aside(run_dir)
        elif retest:
            keep_record(run_dir)
    use_allocated_cpus()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    num_classes = cfg.model.num_classes or datamodule.num_classes
    check_num_classes(num_classes, datamodule.num_classes, cfg.model.name, cfg.data._target_)
    model = build_backbone(cfg.model, num_classes)
    fingerprint = weights_fingerprint(model)
    summary = method.apply(model)
    perf = OmegaConf.to_container(cfg.perf, resolve=True)
    apply_performance_options(model, **{key: value for key, value in perf.items() if key not in PREFIX_CACHE_KEYS})
    datamodule.data_config = model_data_config(model, cfg.data.image_size, cfg.data.crop_pct)
    module_class = SuffixClassifier if cfg.perf.cache_prefix else Classifier
    module = build_module(
        cfg, model, num_classes, method, module_class, param_summary=summary, base_fingerprint=fingerprint
    )
    record = base_record(cfg, method, summary, num_classes) | {"base_fingerprint": fingerprint, "prefix_cache": None}
    results_path = run_dir / RESULTS_FILE

    loggers = instantiate_all(cfg.get("logger"))
    callbacks = [FiniteLoss(), ValidationHistory(), *instantiate_all(cfg.get("callbacks")), TrainThroughput()]
    pruning = trial_pruning(cfg.trial, objective, summary.trainable)
    callbacks = ordered_callbacks([*callbacks, *([pruning] if pruning is not None else [])], objective)
    resume_from = resume_point(cfg, callbacks, loggers)
    if retest and resume_from is None:
        raise MissingInputError(
            f"rerun=test needs the finished run's checkpoints in {run_dir / 'checkpoints'}, which are gone; "
            "resume=false trains it again (the earlier attempt is kept in previous-<n>/)"
        )
    record["resumed_from"] = None if resume_from is None else str(resume_from)
    try:
        trainer = build_trainer(cfg, loggers, callbacks)
        check_launch_in_multirun(cfg, trainer)
        if cfg.perf.cache_prefix:
            datamodule, record["prefix_cache"] = serve_run_prefix_cache(
                cfg, module.model_split, datamodule, fingerprint, trainer
            )
        log_config(loggers, cfg)
        record |= {"status": "completed"} | fit_and_test(cfg, objective, trainer, module, datamodule, resume_from)
        record["skipped_images"] = getattr(datamodule, "skipped_images", None)
        record |= save_run_adapter(
            cfg, method, module, record["best_checkpoint"], record["tested"], fingerprint, num_classes
        )
        record["wall_time_s"] = time.perf_counter() - started
    except BaseException as err:
        record |= ended_by(err)
        raise
    finally:
        if rank_zero_only.rank == 0 and not (retest and record["status"] in ("failed", "interrupted")):
            write_json_atomic(results_path, record)
        finish_wandb(loggers, record)
    log.info("results: %s", results_path)
    return record


def sweep_value(record: dict[str, Any], objective: Objective) -> float | list[float] | None:
    """What a sweeper is told for a run's record: its `objective`; for a record of an earlier release, which has
    none, the same computed from its best validation accuracy (what those releases selected by)."""
    if "objective" in record:
        return record["objective"]
    return objective.sweep_value(record.get("best_val_acc1"), record.get("trainable_params") or 1)


def record_setup_failure(cfg: DictConfig, err: Exception) -> None:
    """Write the failed record of a run that `run` stopped before it had one (a value rejected during set-up).

    Without it a sweep's report would not show the failed point at all. The settings come from the config because
    the method object may be what failed to build.
    """
    path = Path(cfg.paths.output_dir) / RESULTS_FILE
    if path.exists() or rank_zero_only.rank != 0:
        return
    settings = OmegaConf.to_container(cfg.lora, resolve=True)
    target = settings.pop("_target_")
    record = {
        "experiment": cfg.exp_name,
        "model": cfg.model.name,
        "method": get_class(target).name,
        **settings,
        "lr": cfg.optim.lr,
        "seed": cfg.seed,
        "trial": cfg.trial,
        "overrides": list(HydraConfig.get().overrides.task),
        "output_dir": str(cfg.paths.output_dir),
        "status": "failed",
        "error": error_text(err),
    }
    write_json_atomic(path, record)


# From the resolved file: an editable install links the package's files from elsewhere, and `conf/` sits beside the
# package in the checkout only.
@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one job and return its objective.

    In a multirun a failed job must not end the sweep: Hydra would re-raise its exception once the launched batch
    ends, skipping the sweep report and exiting non-zero, and the Optuna sweeper would abort its study. Instead the
    failure is logged with its traceback, its record says `failed`, and the job returns None, which the basic
    sweeper ignores and the Optuna sweeper tells the study as a failed trial. A single run still raises, so its
    exit code is non-zero. A user error (`UserError`: a bad value, missing data or weights) is logged as its
    message alone, without a traceback, and a single run exits with status 2 (`lora_vision.errors`).

    SIGTERM (SLURM pre-emption, `scancel`) is different: the run has saved a resume checkpoint, and the whole
    process must stop (exit status 143, as a process killed by SIGTERM) instead of starting the next job.
    """
    quiet_third_party()
    route_hub_logs_to_root()
    try:
        return sweep_value(run(cfg), Objective.from_config(OmegaConf.to_container(cfg.objective, resolve=True)))
    except SIGTERMException:
        log.warning("stopped by SIGTERM; a run resumes from its last.ckpt with resume=true (the default)")
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
    except Exception as err:
        user_error = isinstance(err, UserError) and not full_traceback_requested()
        if not in_multirun():
            if not user_error:
                raise
            exit_with_message("python -m lora_vision.train", err)
        (log.error if user_error else log.exception)("job failed, the sweep goes on: %s", error_text(err))
        record_setup_failure(cfg, err)
        return None


if __name__ == "__main__":
    sys.argv[1:] = checked_command_line(sys.argv[1:])
    main()
