"""The LightningModule of a multi-task run: each step trains one task's adapters and head on one of its batches.

One AdamW holds every task's parameters. A step's loss reaches only the parameters its task's samples went
through, and the others keep `grad=None`, which AdamW skips (no moment update, no weight decay, no step count): so
each task's parameters take exactly the updates its single-task run would. Each task's learning rate follows its
own warmup + cosine schedule (the one `Classifier` uses, the same torch schedulers), advanced only on the steps
that train it; the shared adapter's advances on every step.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torchmetrics import Metric

from lora_vision.lora import route, set_active_adapters
from lora_vision.module import STAGES, Classifier, accuracy_metrics
from lora_vision.multitask.sampling import EVERY_TASK
from lora_vision.prefix_cache import SuffixClassifier

log = logging.getLogger(__name__)

# The owner of a trainable parameter: the adapter or head name in `...adapters.<name>.` or `...heads.<name>.`.
OWNER = re.compile(r"(?:^|\.)(?:adapters|heads)\.([^.]+)\.")
# Checkpoint keys of the per-owner schedules and of the tasks of a pack stopped by divergence.
SCHEDULES = "task_schedules"
DIVERGED = "diverged_tasks"


def owner_of(name: str) -> str:
    match = OWNER.search(name)
    if match is None:
        raise ValueError(f"trainable parameter {name} belongs to no adapter or head")
    return match[1]


class _Schedule:
    """One owner's learning rates: `Classifier`'s schedulers on a stand-in optimizer with the owner's groups,
    stepped when the owner trains; the real groups copy its rates."""

    def __init__(self, lrs: Sequence[float], total: int, warmup: int, min_lr: float) -> None:
        self.optimizer = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": lr} for lr in lrs])
        cosine = CosineAnnealingLR(self.optimizer, T_max=max(total - warmup, 1), eta_min=min_lr)
        self.scheduler: LRScheduler = cosine
        if warmup > 0:
            ramp = LinearLR(self.optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
            self.scheduler = SequentialLR(self.optimizer, [ramp, cosine], milestones=[warmup])

    @property
    def lrs(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class TaskMean(Metric):
    """The unweighted mean over tasks of each task's per-sample mean (accuracy, loss): every task counts alike,
    whatever its size."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros(tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, task: int, total: torch.Tensor, count: int) -> None:
        self.total[task] += total.double()
        self.count[task] += count

    def compute(self) -> torch.Tensor:
        seen = self.count > 0
        return (self.total[seen] / self.count[seen]).mean().float()


class MultiTaskClassifier(Classifier):
    """`Classifier` over several tasks: the model holds each task's adapters and an `AdapterHeads`.

    Args (besides `Classifier`'s, whose `lr` is the shared adapter's learning rate):
        tasks: per task name, ``{"num_classes": int, "lr": float, "owners": [what its steps train]}``: its
            adapters (the shared one first) and its head, by name.
        steps: per owner (task or shared adapter), the optimizer steps it takes over the whole run.
    Logged: ``<stage>/<task>/acc1|acc5|loss`` per task, and ``val/acc1|acc5|loss`` (and test's) as the unweighted
    mean over tasks, which the run's objective, checkpoints and early stopping rank.
    """

    def __init__(
        self, model: nn.Module, tasks: Mapping[str, Mapping[str, Any]], steps: Mapping[str, int], **settings: Any
    ) -> None:
        super().__init__(model, max(t["num_classes"] for t in tasks.values()), **settings)
        self.automatic_optimization = False
        self.tasks = {name: dict(task) for name, task in tasks.items()}
        self.steps = dict(steps)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": accuracy_metrics(task["num_classes"]).clone(prefix=f"{stage}/{name}/")
                for stage in STAGES
                for name, task in tasks.items()
            }
        )
        self.task_index = {name: index for index, name in enumerate(tasks)}
        self.task_means = nn.ModuleDict(
            {f"{stage}_{name}": TaskMean(len(tasks)) for stage in STAGES for name in ("acc1", "acc5", "loss")}
        )
        self.schedules: dict[str, _Schedule] = {}
        self._groups_of: dict[str, list[int]] = {}
        self._schedules_to_load: dict[str, Any] | None = None
        # Tasks of a packed run stopped by a non-finite loss, with the step.
        self.diverged: dict[str, int] = {}

    def owners(self, task: str) -> list[str]:
        """What a step of `task` trains: its adapters (the shared one too) and its head; of a packed step, those of
        every task still training."""
        if task == EVERY_TASK:
            return [owner for name in self.training_tasks() for owner in self.tasks[name]["owners"]]
        return self.tasks[task]["owners"]

    def training_tasks(self) -> list[str]:
        return [name for name in self.tasks if name not in self.diverged]

    def lr_of(self, owner: str) -> float:
        return self.tasks[owner]["lr"] if owner in self.tasks else self.hparams.lr

    def _forward(self, task: str, images: torch.Tensor, batch: int) -> list[tuple[str, torch.Tensor]]:
        """(task, logits) of each task the batch goes through: one task, or, in a packed step, every task still
        training, on copies of the batch routed each to its own adapters and head in one pass."""
        if task != EVERY_TASK:
            set_active_adapters(self.model, self.owners(task))
            return [(task, self(images))]
        tasks = self.training_tasks()
        with route(self.model, [name for name in tasks for _ in range(batch)]):
            logits = self(images.repeat(len(tasks), *[1] * (images.dim() - 1)))
        return list(zip(tasks, logits.split(batch), strict=True))

    def _step(self, batch: tuple[str, tuple[torch.Tensor, torch.Tensor]], stage: str) -> torch.Tensor | None:
        """The summed loss of the tasks `batch` trains (their parameters are disjoint, so each gets its own
        gradient); None when none is left. A task whose loss is not finite in a packed training step stops there,
        keeping its last finite weights, and the others go on."""
        task, (images, labels) = batch
        # Logged from the step, as `Classifier` logs, so that callbacks see each epoch's values at its end.
        logged = {"on_step": False, "on_epoch": True, "add_dataloader_idx": False, "batch_size": len(labels)}
        total = None
        for name, logits in self._forward(task, images, len(labels)):
            loss = self.criterion(logits, labels)
            if stage == "train" and task == EVERY_TASK and not torch.isfinite(loss):
                self.diverged[name] = self.global_step
                log.warning("task %s: loss %s at step %d; it stops, the others go on", name, loss, self.global_step)
                continue
            metrics = self.metrics[f"{stage}_{name}"]
            metrics.update(logits, labels)
            self.log_dict(metrics, **logged)
            self.log(f"{stage}/{name}/loss", loss, **logged)
            index = self.task_index[name]
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
            sums = {"acc1": top[:, 0].sum(), "acc5": top.any(-1).sum(), "loss": loss.detach() * len(labels)}
            for key, value in sums.items():
                self.task_means[f"{stage}_{key}"].update(index, value, len(labels))
            if stage == "train":
                self.log(f"train/{name}/loss_step", loss, on_step=True, on_epoch=False, batch_size=len(labels))
            total = loss if total is None else total + loss
        return total

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        owners = self.owners(batch[0])
        loss = self._step(batch, "train")
        if loss is None:
            self.trainer.should_stop = True  # every task of the pack has diverged
            return None
        self.manual_backward(loss)
        clip = self.trainer.gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        optimizer.step()
        self._advance([owner for owner in owners if owner in self.owners(batch[0])], optimizer.optimizer)
        return loss

    def _log_means(self, stage: str) -> None:
        # Lightning refuses one key logged from several dataloaders' steps, so the means are logged here, once per
        # epoch, after the callbacks' epoch-end hooks: callbacks read them at `on_validation_end`.
        for name in ("acc1", "acc5", "loss"):
            mean = self.task_means[f"{stage}_{name}"]
            if mean.update_called:
                self.log(f"{stage}/{name}", mean.compute(), prog_bar=stage != "train")
            mean.reset()

    def on_train_epoch_end(self) -> None:
        self._log_means("train")

    def on_validation_epoch_end(self) -> None:
        self._log_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_means("test")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "test")

    # Optimizer and per-owner schedules ---------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """timm's weight-decay groups per owner (adapters and heads: no 1-d parameter decays, as in `Classifier`),
        each at the owner's learning rate times its LoRA+ ratio."""
        hp = self.hparams
        ratios = dict(hp.lr_ratios or {})
        by_owner: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                by_owner.setdefault(owner_of(name), []).append((name, p))
        groups = []
        for owner, named in by_owner.items():
            owned = nn.ParameterDict({str(i): p for i, (_, p) in enumerate(named)})
            names = {id(p): name for name, p in named}
            for group in param_groups_weight_decay(owned, hp.weight_decay):
                for ratio in sorted({ratios.get(names[id(p)], 1.0) for p in group["params"]}):
                    params = [p for p in group["params"] if ratios.get(names[id(p)], 1.0) == ratio]
                    if params:
                        groups.append({**group, "params": params, "lr": self.lr_of(owner) * ratio, "owner": owner})
        return groups

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=tuple(hp.betas))
        self._groups_of = {}
        for index, group in enumerate(optimizer.param_groups):
            self._groups_of.setdefault(group["owner"], []).append(index)
        self.schedules = {}
        for owner, indices in self._groups_of.items():
            total = max(self.steps.get(owner, 1), 1)
            lrs = [optimizer.param_groups[i]["lr"] for i in indices]
            warmup = self._warmup_steps(total, self.tasks.get(owner, {}).get("warmup_epochs"))
            self.schedules[owner] = _Schedule(lrs, total, warmup, hp.min_lr)
        if self._schedules_to_load is not None:
            for owner, state in self._schedules_to_load.items():
                self.schedules[owner].load_state_dict(state)
            self._schedules_to_load = None
        self._copy_rates(optimizer, self.schedules)
        return optimizer

    def _copy_rates(self, optimizer: torch.optim.Optimizer, owners: Mapping[str, _Schedule]) -> None:
        for owner, schedule in owners.items():
            for index, lr in zip(self._groups_of[owner], schedule.lrs, strict=True):
                optimizer.param_groups[index]["lr"] = lr

    def _advance(self, owners: Sequence[str], optimizer: torch.optim.Optimizer) -> None:
        stepped = {owner: self.schedules[owner] for owner in owners if owner in self.schedules}
        for schedule in stepped.values():
            schedule.optimizer.step()  # a no-op (no gradients) that torch's schedulers expect before theirs
            schedule.scheduler.step()
        self._copy_rates(optimizer, stepped)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[SCHEDULES] = {owner: schedule.state_dict() for owner, schedule in self.schedules.items()}
        checkpoint[DIVERGED] = dict(self.diverged)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Lightning restores the module before it calls configure_optimizers, which builds the schedules.
        self._schedules_to_load = checkpoint.get(SCHEDULES)
        self.diverged = dict(checkpoint.get(DIVERGED) or {})


class SuffixMultiTaskClassifier(MultiTaskClassifier, SuffixClassifier):
    """A packed run's `MultiTaskClassifier` fed the frozen prefix's cached activations (`perf.cache_prefix`): its
    forward runs only the suffix, where every point's adapters are (the prefix ends below the lowest of them)."""
