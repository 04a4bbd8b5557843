"""One multi-task run: the tasks' adapters and heads trained together on one frozen backbone (see
`lora_vision.multitask`), each task then tested at its own selected epoch and saved as its own adapter.

Writes `<run dir>/tasks/<task>/results.json` and `<run dir>/tasks/<task>/adapter/` per task (a record and an
adapter like a single-task run's: `lora_vision.report` lists the tasks as rows, `load_adapted_model` loads each
adapter alone), `<run dir>/checkpoints/<task>.safetensors` (the task's weights at its selected epoch) and a summary
`<run dir>/results.json`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from lora_vision.adapters import ADAPTER_DIR, ADAPTER_TENSORS, save_adapter
from lora_vision.builders import base_source, build_trainer, instantiate_all
from lora_vision.callbacks import FiniteLoss, TrainThroughput, ended_by
from lora_vision.config_checks import ConfigError
from lora_vision.lora import summarize
from lora_vision.models import model_data_config, model_label
from lora_vision.multitask.config import SHARED, MultiTaskSpec, read_spec
from lora_vision.multitask.data import MultiTaskDataModule
from lora_vision.multitask.model import build_multitask_model, single_task_model
from lora_vision.multitask.module import MultiTaskClassifier, SuffixMultiTaskClassifier, owner_of
from lora_vision.multitask.sampling import EVERY_TASK, task_draws
from lora_vision.objective import Objective, ValidationHistory
from lora_vision.performance import apply_performance_options
from lora_vision.prefix_cache import serve_run_prefix_cache
from lora_vision.rerun import check_same_run, describe_finished, finished, previous_record, set_aside
from lora_vision.results import RESULTS_FILE, finite_or_none, git_state, versions, write_json_atomic
from lora_vision.resume import ResumeCheckpoint, resume_point

log = logging.getLogger(__name__)

TASKS_DIR = "tasks"


class MeanValidationHistory(ValidationHistory):
    """`ValidationHistory` of the means over tasks, which the module logs after the callbacks' epoch-end hooks."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        return

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)


class TaskSelection(L.Callback):
    """Each task's selected epoch, by the objective's metric on that task's validation data (`val/<task>/acc1` for
    `val/acc1`), and the weights its samples go through at that epoch, in `<dirpath>/<task>.safetensors`."""

    def __init__(self, objective: Objective, owners: dict[str, list[str]], dirpath: str | Path) -> None:
        self.objective = objective
        self.owners = owners
        self.dirpath = Path(dirpath)
        self.history: dict[str, dict[int, float]] = {task: {} for task in owners}

    def metric(self, task: str) -> str:
        stage, name = self.objective.metric.split("/", 1)
        return f"{stage}/{task}/{name}"

    def path(self, task: str) -> Path:
        return self.dirpath / f"{task}.safetensors"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for task, owners in self.owners.items():
            value = trainer.callback_metrics.get(self.metric(task))
            if value is None:
                continue
            self.history[task][trainer.current_epoch] = float(value)
            picked = self.objective.selected(self.history[task])
            if picked is not None and picked[0] == trainer.current_epoch and trainer.is_global_zero:
                tensors = {
                    name: p.detach().cpu().contiguous()
                    for name, p in pl_module.model.named_parameters()
                    if p.requires_grad and owner_of(name) in owners
                }
                self._write(self.path(task), tensors)

    @staticmethod
    def _write(path: Path, tensors: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp)
        os.replace(tmp, path)

    def selected(self, task: str) -> tuple[int, float] | None:
        return self.objective.selected(self.history[task])

    def load(self, module: MultiTaskClassifier, task: str) -> None:
        """Put `task`'s selected weights into `module` (the last epoch's stay where nothing was selected)."""
        if self.path(task).is_file():
            module.model.load_state_dict(load_file(self.path(task)), strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {task: {str(e): v for e, v in h.items()} for task, h in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for task, history in state_dict["history"].items():
            self.history[task] = {int(epoch): value for epoch, value in history.items()}


def owner_steps(spec: MultiTaskSpec, sizes: dict[str, int], seed: int, epochs: int) -> dict[str, int]:
    """The optimizer steps each task (and the shared adapter) takes over `epochs` epochs of the sampling rule."""
    counts: Counter[str] = Counter()
    for epoch in range(epochs):
        counts.update(task_draws(spec.sampling, sizes, seed=seed, epoch=epoch, temperature=spec.temperature))
    if EVERY_TASK in counts:  # packed: every task trains on every step
        counts = Counter(dict.fromkeys(spec.tasks, counts.pop(EVERY_TASK)))
    return {**dict(counts), **({SHARED: sum(counts.values())} if spec.shared is not None else {})}


def identity(cfg: DictConfig, spec: MultiTaskSpec) -> dict[str, Any]:
    """What decides what the run trains (compared by a rerun in the same directory)."""
    return {
        "model": cfg.model.name,
        "model_kwargs": OmegaConf.to_container(cfg.model.kwargs, resolve=True),
        "pretrained": cfg.model.pretrained,
        "seed": cfg.seed,
        "max_epochs": cfg.trainer.max_epochs,
        "sharing": spec.sharing,
        "sampling": spec.sampling,
        "temperature": spec.temperature,
        "shared": None if spec.shared is None else spec.shared.describe(),
        "task_settings": {
            name: {
                "data": OmegaConf.to_container(task.data, resolve=True),
                "lr": task.lr,
                "warmup_epochs": task.warmup_epochs,
                "adapter": None if task.adapter is None else task.adapter.describe(),
            }
            for name, task in spec.tasks.items()
        },
    }


def _check_trainer(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    if not isinstance(trainer.max_epochs, int) or trainer.max_epochs < 1:
        raise ConfigError(
            f"trainer.max_epochs={trainer.max_epochs}: a multi-task run plans each task's schedule over whole "
            "epochs; give an integer >= 1"
        )
    for key, fine in (("accumulate_grad_batches", 1), ("limit_train_batches", None), ("devices", 1)):
        if trainer.get(key, fine) not in (fine, 1.0 if fine == 1 else fine):
            raise ConfigError(
                f"trainer.{key}={trainer.get(key)} is not supported in a multi-task run (each step trains one task "
                f"on one device); leave it at {fine}"
            )


def _check_perf(cfg: DictConfig, spec: MultiTaskSpec) -> None:
    """Refuse the `perf` options a multi-task run cannot honour; `channels_last` and (packed) `cache_prefix` it can."""
    for key, why in (
        ("compile", "the routing of samples to adapters changes from step to step, and each change would recompile"),
        ("grad_checkpointing", "the backward pass would recompute blocks outside the step's routing of samples"),
    ):
        if cfg.perf[key]:
            raise ConfigError(
                f"perf.{key}={cfg.perf[key]} is not supported in a multi-task run: {why}; set perf.{key}=false "
                "(hydra/launcher=packed runs such jobs apart, as single runs)"
            )
    if cfg.perf.cache_prefix and spec.sampling != "packed":
        raise ConfigError(
            f"perf.cache_prefix=true with multitask.sampling={spec.sampling}: the tasks' images differ, so their "
            "prefix activations would be cached and fed separately; it works with multitask.sampling=packed (one "
            "data config, as hydra/launcher=packed runs), else set perf.cache_prefix=false"
        )


def run_multitask(cfg: DictConfig, objective: Objective) -> dict[str, Any]:
    """Train the tasks of `cfg.multitask` together; return the summary record (also `<run dir>/results.json`)."""
    started = time.perf_counter()
    spec = read_spec(cfg)
    _check_trainer(cfg)
    _check_perf(cfg, spec)
    if spec.sampling == "packed" and not cfg.module.frozen_bn_eval:
        raise ConfigError(
            "module.frozen_bn_eval=false with multitask.sampling=packed: a frozen BatchNorm in train mode would "
            "normalise every point's copy of a batch with statistics of all points; keep module.frozen_bn_eval=true"
        )
    run_dir = Path(cfg.paths.output_dir)
    wanted = identity(cfg, spec)
    previous = previous_record(run_dir)
    if previous is not None and cfg.resume is not False:
        check_same_run(previous, wanted, run_dir)
    if finished(previous) and cfg.resume is not False:
        if cfg.rerun != "report":
            raise ConfigError(f"rerun={cfg.rerun}: a finished multi-task run is reported; resume=false trains it again")
        log.info(describe_finished(previous, run_dir))
        return previous
    if cfg.resume is False and rank_zero_only.rank == 0:
        set_aside(run_dir)
    model, fingerprint, datamodules = build_multitask_model(cfg, spec)
    apply_performance_options(model, channels_last=cfg.perf.channels_last)
    num_classes = {name: dm.num_classes for name, dm in datamodules.items()}
    for name, task in spec.tasks.items():
        datamodules[name].data_config = model_data_config(model, task.data.image_size, task.data.get("crop_pct"))
    data = MultiTaskDataModule(datamodules, spec.sampling, seed=cfg.seed, temperature=spec.temperature)
    data.prepare_data()  # archives extracted before the loaders are counted
    sizes = {name: len(dm.train_dataloader()) for name, dm in datamodules.items()}
    summary = summarize(model)
    owners = {name: list(dict.fromkeys([*spec.adapters_of(name), name])) for name in spec.tasks}
    tasks = {
        n: {"num_classes": num_classes[n], "lr": t.lr, "warmup_epochs": t.warmup_epochs, "owners": owners[n]}
        for n, t in spec.tasks.items()
    }
    module_class = SuffixMultiTaskClassifier if cfg.perf.cache_prefix else MultiTaskClassifier
    module = module_class(
        model,
        tasks,
        owner_steps(spec, sizes, cfg.seed, cfg.trainer.max_epochs),
        **OmegaConf.to_container(cfg.optim, resolve=True),
        **OmegaConf.to_container(cfg.module, resolve=True),
        lr_ratios=_loraplus_ratios(model, spec),
        param_summary=summary,
        base_fingerprint=fingerprint,
    )
    record: dict[str, Any] = {
        "experiment": cfg.exp_name,
        **wanted,
        "model_label": model_label(cfg.model.name, wanted["model_kwargs"], cfg.model.pretrained, cfg.model.checkpoint),
        "method": "lora",
        "base_fingerprint": fingerprint,
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "adapter_params": summary.adapter_params,
        "versions": versions(),
        **git_state(),
        "output_dir": str(run_dir),
        "status": "running",
        "prefix_cache": None,
        "tasks": {},
    }
    selection = TaskSelection(objective, owners, run_dir / "checkpoints")
    loggers = instantiate_all(cfg.get("logger"))
    configured = [c for c in instantiate_all(cfg.get("callbacks")) if not isinstance(c, ModelCheckpoint)]
    callbacks = [FiniteLoss(), MeanValidationHistory(), selection, *configured, TrainThroughput()]
    callbacks.sort(key=lambda c: isinstance(c, ResumeCheckpoint))
    for callback in callbacks:
        if isinstance(callback, ResumeCheckpoint):
            # Resumed mid-epoch under manual optimization, Lightning (2.6) miscounts the resumed epochs' steps and
            # ends them early; from an epoch end it resumes exactly. So an interrupted epoch is trained again.
            callback.mid_epoch = False
    resume_from = resume_point(cfg, callbacks, loggers)
    record["resumed_from"] = None if resume_from is None else str(resume_from)
    try:
        trainer = build_trainer(cfg, loggers, callbacks)
        if cfg.perf.cache_prefix:
            # The points of a pack share one data config: one cache, served to every point's copy of a batch.
            first = next(iter(spec.tasks))
            cached, record["prefix_cache"] = serve_run_prefix_cache(
                cfg, module.model_split, datamodules[first], fingerprint, trainer, data=spec.tasks[first].data
            )
            data.datamodules = dict.fromkeys(spec.tasks, cached)
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
        history = next(c for c in trainer.callbacks if isinstance(c, ValidationHistory))
        record |= {"status": "completed", **history.record(objective, summary.trainable)}
        scores = test_pack(trainer, module, data, selection) if cfg.test and spec.sampling == "packed" else {}
        for name in spec.tasks:
            record["tasks"][name] = finish_task(
                cfg, spec, name, trainer, module, data, selection, fingerprint, scores.get(name)
            )
        tested = [t["test_acc1"] for t in record["tasks"].values() if t.get("test_acc1") is not None]
        throughput = next(c for c in trainer.callbacks if isinstance(c, TrainThroughput))
        record |= {
            "mean_test_acc1": sum(tested) / len(tested) if tested else None,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "train_images_per_s": throughput.images_per_second,
            "wall_time_s": time.perf_counter() - started,
        }
    except BaseException as err:
        record |= ended_by(err)
        raise
    finally:
        if rank_zero_only.rank == 0:
            write_json_atomic(run_dir / RESULTS_FILE, record)
    log.info("results: %s", run_dir / RESULTS_FILE)
    return record


def _loraplus_ratios(model: Any, spec: MultiTaskSpec) -> dict[str, float]:
    """LoRA+'s learning-rate ratio for the B factor of every adapter whose settings ask for it."""
    methods = {SHARED: spec.shared, **{name: task.adapter for name, task in spec.tasks.items()}}
    ratios = {}
    for name, _ in model.named_parameters():
        if ".adapters." in name and name.endswith(".lora_B"):
            method = methods.get(owner_of(name))
            if method is not None and method.settings.loraplus_lr_ratio is not None:
                ratios[name] = method.settings.loraplus_lr_ratio
    return ratios


def test_pack(
    trainer: L.Trainer, module: MultiTaskClassifier, data: MultiTaskDataModule, selection: TaskSelection
) -> dict[str, dict[str, Any]]:
    """The test scores of every point of a pack still training, each at its own selected epoch, from one pass over
    the shared test set: the points' weights are disjoint, so all are loaded at once, and each batch goes through
    every point on its own routed copy, as in training."""
    tasks = module.training_tasks()
    if not tasks:
        return {}
    for task in tasks:
        selection.load(module, task)
    data.test_tasks = [EVERY_TASK]
    scores = trainer.test(module, datamodule=data, verbose=False)[0]
    return {task: {key: value for key, value in scores.items() if key.startswith(f"test/{task}/")} for task in tasks}


def finish_task(
    cfg: DictConfig,
    spec: MultiTaskSpec,
    task: str,
    trainer: L.Trainer,
    module: MultiTaskClassifier,
    data: MultiTaskDataModule,
    selection: TaskSelection,
    fingerprint: str,
    scores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Test `task` at its selected epoch (unless `scores` holds its test scores already), save its adapter and
    write its record; return the record's outcome."""
    selection.load(module, task)
    picked = selection.selected(task)
    if scores is None:
        scores = {}
        if cfg.test and task not in module.diverged:
            data.test_tasks = [task]
            scores = trainer.test(module, datamodule=data, verbose=False)[0]
    task_dir = Path(cfg.paths.output_dir) / TASKS_DIR / task
    method = spec.saved_method(task)
    single = single_task_model(module.model, spec, task)
    entry = spec.tasks[task]
    status: dict[str, Any] = {"status": "completed"}
    if task in module.diverged:
        status = {"status": "diverged", "diverged_at_step": module.diverged[task]}
    outcome: dict[str, Any] = {
        **status,
        "best_val_acc1": max(selection.history[task].values(), default=None),
        "objective_metric": selection.metric(task),
        "objective_epoch": None if picked is None else picked[0],
        "objective_metric_value": None if picked is None else picked[1],
        "test_acc1": finite_or_none(scores.get(f"test/{task}/acc1")),
        "test_acc5": finite_or_none(scores.get(f"test/{task}/acc5")),
        "test_loss": finite_or_none(scores.get(f"test/{task}/loss")),
    }
    if rank_zero_only.rank == 0:
        directory = save_adapter(
            single,
            task_dir / ADAPTER_DIR,
            model_name=cfg.model.name,
            model_kwargs=OmegaConf.to_container(cfg.model.kwargs, resolve=True),
            num_classes=module.tasks[task]["num_classes"],
            method_config=method.config(),
            base_fingerprint=fingerprint,
            base_source=base_source(cfg),
            data=OmegaConf.to_container(entry.data, resolve=True),
            extra={"experiment": cfg.exp_name, "multitask": {"task": task, "sharing": spec.sharing}},
            all_batchnorm_stats=not cfg.module.frozen_bn_eval,
        )
        outcome |= {"adapter_dir": str(directory), "adapter_bytes": (directory / ADAPTER_TENSORS).stat().st_size}
        per_task = summarize(single)
        write_json_atomic(
            task_dir / RESULTS_FILE,
            {
                "experiment": f"{cfg.exp_name}/{task}",
                "model": cfg.model.name,
                "model_label": model_label(
                    cfg.model.name,
                    OmegaConf.to_container(cfg.model.kwargs, resolve=True),
                    cfg.model.pretrained,
                    cfg.model.checkpoint,
                ),
                **method.describe(),
                "data": entry.data._target_.rsplit(".", 1)[-1],
                "image_size": entry.data.image_size,
                "seed": cfg.seed,
                "lr": entry.lr,
                "batch_size": entry.data.batch_size,
                "max_epochs": cfg.trainer.max_epochs,
                "num_classes": module.tasks[task]["num_classes"],
                "multitask": {"task": task, "sharing": spec.sharing, "sampling": spec.sampling},
                "trainable_params": per_task.trainable,
                "total_params": per_task.total,
                "trainable_percent": per_task.trainable_percent,
                "adapter_params": per_task.adapter_params,
                **status,
                "tested": bool(scores),
                **outcome,
                "output_dir": str(task_dir),
                "versions": versions(),
            },
        )
    return outcome
