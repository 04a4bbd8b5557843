"""Training entry point: `python -m lora_vision.train +exp=vit_r8` (Hydra; see conf/train.yaml).

One run: check the config, build the backbone, apply the method (LoRA or a baseline), fit, test the best
checkpoint, and write `results.json` into the run directory. The returned objective (best validation top-1
accuracy, optionally penalised by the trainable parameter count; see `objective`) is what Hydra sweepers such as
Optuna maximise.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lora_vision.adapters import ADAPTER_DIR, ADAPTER_TENSORS, save_adapter, weights_fingerprint
from lora_vision.builders import (
    build_backbone,
    build_datamodule,
    build_method,
    build_module,
    check_num_classes,
    instantiate_all,
)
from lora_vision.callbacks import DivergedError, FiniteLoss, TrainThroughput
from lora_vision.cli import canonical_overrides
from lora_vision.config_checks import ConfigError, check_accelerator, check_appended_keys, check_config
from lora_vision.errors import UserError, exit_with_message, full_traceback_requested
from lora_vision.models import model_data_config, route_hub_logs_to_root
from lora_vision.module import Classifier
from lora_vision.performance import apply_performance_options
from lora_vision.prefix_cache import PREFIX_CACHE_KEYS, SuffixClassifier, serve_run_prefix_cache
from lora_vision.preflight import check_output_dir
from lora_vision.results import PROJECT_ROOT, RESULTS_FILE, finite_or_none, git_state, versions, write_json_atomic
from lora_vision.resume import AtomicCheckpointIO, keep_interrupted_metrics, requested_checkpoint
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
    # Lightning has no public way to ask whether a strategy re-runs the script; its launcher class tells.
    relaunches = isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and trainer.num_devices > 1
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


def base_record(cfg: DictConfig, method: Any, summary: Any, num_classes: int) -> dict[str, Any]:
    """What the run is and what it trains, known before training starts."""
    return {
        "experiment": cfg.exp_name,
        "model": cfg.model.name,
        **method.describe(),
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        **{key: cfg.data[key] for key in ("task", "protocol") if key in cfg.data},
        "image_size": cfg.data.image_size,
        "num_classes": num_classes,
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "trainable_percent": summary.trainable_percent,
        "adapter_params": summary.adapter_params,
        "seed": cfg.seed,
        "lr": cfg.optim.lr,
        "batch_size": cfg.data.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "versions": versions(),
        **git_state(),
        "output_dir": str(cfg.paths.output_dir),
        "trial": cfg.trial,
        "status": "running",
    }


def fit_and_test(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: Classifier,
    datamodule: L.LightningDataModule,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Fit (from `resume_from` when given), then test the best checkpoint; return the outcome fields of the record.

    A trial stopped by the search's pruner is not tested: it ends `pruned`, with the last epoch it trained.
    """
    throughput = next(c for c in trainer.callbacks if isinstance(c, TrainThroughput))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    pruned_at = next((c.pruned_at_epoch for c in trainer.callbacks if isinstance(c, TrialPruning)), None)
    test_metrics: dict[str, Any] = {}
    if cfg.test and pruned_at is None:
        # Without a best checkpoint (checkpointing off, fast_dev_run) the final weights are tested.
        test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None)[0]
    return {
        "best_val_acc1": finite_or_none(checkpoint.best_model_score if checkpoint is not None else None),
        "test_acc1": finite_or_none(test_metrics.get("test/acc1")),
        "test_acc5": finite_or_none(test_metrics.get("test/acc5")),
        "test_loss": finite_or_none(test_metrics.get("test/loss")),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "best_checkpoint": best_path or None,
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


def base_source(cfg: DictConfig) -> dict[str, Any]:
    """Where the base weights came from, so the adapter can be put back on the same ones.

    The seed counts only for a randomly initialised base: its weights are drawn right after seeding.
    """
    checkpoint = cfg.model.checkpoint
    return {
        "pretrained": cfg.model.pretrained,
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).expanduser().resolve()),
        "seed": cfg.seed,
    }


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
        # The run's own checkpoint, so unpickling its Lightning metadata is safe.
        checkpoint = torch.load(best_checkpoint, map_location="cpu", weights_only=False)
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


def check_run(cfg: DictConfig) -> None:
    """Every check that needs no model or data: the output directory, the values, the keys, the accelerator."""
    check_output_dir(cfg.paths.output_dir)
    check_config(cfg)
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        check_appended_keys(hydra_cfg.overrides.task, hydra_cfg.runtime.choices, cfg)
    check_accelerator(cfg)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; return the record written to `<run dir>/results.json`."""
    started = time.perf_counter()
    check_run(cfg)
    L.seed_everything(cfg.seed, workers=True)
    method = build_method(cfg.lora)
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
    results_path = Path(cfg.paths.output_dir) / RESULTS_FILE

    loggers = instantiate_all(cfg.get("logger"))
    callbacks = [FiniteLoss(), *instantiate_all(cfg.get("callbacks")), TrainThroughput()]
    pruning = trial_pruning(cfg.trial)
    callbacks += [pruning] if pruning is not None else []
    resume_from = requested_checkpoint(cfg, callbacks)
    record["resumed_from"] = None if resume_from is None else str(resume_from)
    if resume_from is not None and rank_zero_only.rank == 0:
        keep_interrupted_metrics(loggers)
    try:
        trainer: L.Trainer = instantiate(
            cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
        )
        check_launch_in_multirun(cfg, trainer)
        if cfg.perf.cache_prefix:
            datamodule, record["prefix_cache"] = serve_run_prefix_cache(cfg, module, datamodule, fingerprint, trainer)
        log_config(loggers, cfg)
        record |= {"status": "completed"} | fit_and_test(cfg, trainer, module, datamodule, resume_from)
        record["skipped_images"] = getattr(datamodule, "skipped_images", None)
        record |= save_run_adapter(
            cfg, method, module, record["best_checkpoint"], record["tested"], fingerprint, num_classes
        )
        record["wall_time_s"] = time.perf_counter() - started
    except DivergedError as err:
        record |= {"status": "diverged", "diverged_at_step": err.step, "error": error_text(err)}
        raise
    except SIGTERMException:
        record |= {"status": "interrupted", "error": "SIGTERM; resume with resume=true in the same run directory"}
        raise
    except BaseException as err:
        record |= {"status": "failed", "error": error_text(err)}
        raise
    finally:
        if rank_zero_only.rank == 0:
            write_json_atomic(results_path, record)
        finish_wandb(loggers, record)
    log.info("results: %s", results_path)
    return record


def objective(record: dict[str, Any], settings: DictConfig) -> float | list[float] | None:
    """What a sweeper optimises: `best_val_acc1 - param_penalty * log10(trainable_params)`, or with
    `settings.pareto` the two values `[best_val_acc1, trainable_params]` (accuracy up, parameters down).

    log10, because parameter budgets span orders of magnitude (a rank-1 adapter trains thousands of parameters,
    full fine-tuning ~1e8): `param_penalty` is the validation accuracy (a fraction) each tenfold increase must gain
    to pay for itself. None when the run has no validation accuracy.
    """
    accuracy = record["best_val_acc1"]
    if accuracy is None:
        return None
    if settings.pareto:
        return [accuracy, float(record["trainable_params"])]
    return accuracy - settings.param_penalty * math.log10(record["trainable_params"])


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
    route_hub_logs_to_root()
    try:
        return objective(run(cfg), cfg.objective)
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
    sys.argv[1:] = canonical_overrides(sys.argv[1:])
    main()
