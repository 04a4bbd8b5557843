"""Objects built from the composed run config, shared by every tool that reads one (train, evaluate, bench).

Kept apart from `lora_vision.train`, the entry point, so that no tool imports the training script.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lora_vision.config_checks import ConfigError
from lora_vision.errors import UserError
from lora_vision.models import build_model
from lora_vision.module import Classifier
from lora_vision.resume import AtomicCheckpointIO

# Keys of the `data` group that describe the model input rather than the datamodule; they reach the
# datamodule through its `data_config`.
INPUT_KEYS = ("image_size", "crop_pct")


def instantiate_validated(cfg: DictConfig) -> Any:
    """`instantiate(cfg)` for classes whose constructors validate their options.

    Hydra wraps constructor errors in its own exception; the constructor's UserError already names the key,
    the bad value and the valid ones, so it is raised as is.
    """
    try:
        return instantiate(cfg, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def build_method(lora_cfg: DictConfig) -> Any:
    """The fine-tuning method of the `lora` group (LoRA, LinearProbe or FullFineTune)."""
    return instantiate_validated(lora_cfg)


def build_datamodule(data_cfg: DictConfig) -> L.LightningDataModule:
    """The datamodule of the `data` group, without its input-size keys (they go into `data_config` later)."""
    options = {key: value for key, value in data_cfg.items() if key not in INPUT_KEYS}
    return instantiate_validated(OmegaConf.create(options))


def build_backbone(model_cfg: DictConfig, num_classes: int, random_init: bool = False) -> nn.Module:
    """The timm backbone of the `model` group; `random_init` skips any pretrained weights or checkpoint."""
    return build_model(
        model_cfg.name,
        num_classes=num_classes,
        pretrained=model_cfg.pretrained and not random_init,
        checkpoint=None if random_init else model_cfg.checkpoint,
        kwargs=OmegaConf.to_container(model_cfg.kwargs, resolve=True),
        zero_init_head=model_cfg.zero_init_head,
    )


def build_module(
    cfg: DictConfig,
    model: nn.Module,
    num_classes: int,
    method: Any,
    module_class: type[Classifier] = Classifier,
    **extra: Any,
) -> Classifier:
    """The LightningModule training `model` with the run's `optim` and `module` settings and the method's lr ratios."""
    return module_class(
        model,
        num_classes,
        **OmegaConf.to_container(cfg.optim, resolve=True),
        **OmegaConf.to_container(cfg.module, resolve=True),
        lr_ratios=method.lr_ratios(model),
        **extra,
    )


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a logger or callback group (none when the group is null)."""
    if not group:
        return []
    return [instantiate(entry, _convert_="all") for entry in group.values() if "_target_" in entry]


def check_num_classes(model_classes: int, data_classes: int, model_name: str, data_target: str) -> None:
    if model_classes != data_classes:
        raise ConfigError(
            f"model.num_classes={model_classes} does not match the {data_classes} classes of the data "
            f"({data_target}); set model.num_classes=null to size the {model_name} head from the data"
        )


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


def use_allocated_cpus() -> None:
    """Under SLURM, compute with as many threads as the job was given CPUs (`SLURM_CPUS_PER_TASK`), unless
    `OMP_NUM_THREADS` says otherwise.

    torch starts one thread per core of the node. Where the cluster does not bind a job to its CPUs (no cgroup or
    affinity task plugin), jobs sharing a node then run more threads than it has cores, and each parallel region of
    a job waits at OpenMP's barrier for its threads that another job has pushed off the cores.
    """
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus is not None and cpus.isdigit() and int(cpus) > 0 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(int(cpus))


def build_trainer(cfg: DictConfig, loggers: list[Any], callbacks: list[Any]) -> L.Trainer:
    """The run's Trainer (the `trainer` group) with its loggers and callbacks, writing checkpoints atomically.

    Under SLURM, Lightning's own auto-requeue is off: it would ignore SIGTERM (its "Bypassing SIGTERM"), which is
    how SLURM stops a job it requeues (`scontrol requeue`, preemption, and submitit's requeue at the time limit),
    so the run would be killed after the cluster's KillWait without saving. With it off, SIGTERM saves `last.ckpt`
    where the run stands (`lora_vision.resume`) and the requeued job resumes from there; the launcher (submitit)
    does the requeueing.
    """
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins)
