"""The data of a multi-task run: each task's own datamodule, one training stream that draws each step's batch from
one task (`lora_vision.multitask.sampling`), and per-task validation and test loaders.

A training step's batch is `(task, (images, labels))`: one task's images, at that task's size, through that
task's adapters and head. Tasks may differ in image size, class count and transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lora_vision.data.resumable import ResumableDataLoader
from lora_vision.multitask.sampling import EVERY_TASK, task_draws


class _Stream:
    """One task's batches, pass after shuffled pass, without the first `skip` (passes skipped still draw their
    order, so the loader's generator advances as when they were read)."""

    def __init__(self, loader: ResumableDataLoader, skip: int) -> None:
        self.loader = loader
        size = len(loader)
        for _ in range(skip // size):
            loader._skip = size
            for _ in loader:
                pass
        loader._skip = skip % size
        self.iterator: Iterator[Any] | None = None

    def next(self) -> Any:
        if self.iterator is None:
            self.iterator = iter(self.loader)
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)


class MultiTaskBatches:
    """The training stream: `(task, batch)` per step, tasks drawn by `rule` for the epoch `epoch()` returns.

    Resumable mid-epoch as `ResumableDataLoader` is (Lightning's `state_dict` protocol, `consumed` set by
    `lora_vision.resume.ResumeCheckpoint`): the state is each task loader's generator at the epoch's start and the
    steps trained in it; a resumed epoch redraws the same tasks and skips what was trained.
    """

    def __init__(
        self,
        loaders: Mapping[str, ResumableDataLoader],
        rule: str,
        *,
        seed: int,
        temperature: float,
        epoch: Callable[[], int],
    ) -> None:
        self.loaders = dict(loaders)
        self.rule, self.seed, self.temperature, self.epoch = rule, seed, temperature, epoch
        self.consumed = 0
        self.pass_done = False
        self._skip = 0
        self._starts: dict[str, torch.Tensor] | None = None

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(loader) for name, loader in self.loaders.items()}

    def __len__(self) -> int:
        return len(self.draws(0))

    def draws(self, epoch: int) -> list[str]:
        return task_draws(self.rule, self.sizes, seed=self.seed, epoch=epoch, temperature=self.temperature)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        draws = self.draws(self.epoch())
        self._starts = {name: loader.generator.get_state() for name, loader in self.loaders.items()}
        skip, self._skip = self._skip, 0
        self.consumed, self.pass_done = skip, False
        if self.rule == "packed":
            # Every task trains on the batches of the first task's loader (the tasks share one data config).
            stream = _Stream(next(iter(self.loaders.values())), skip)
            return ((EVERY_TASK, stream.next()) for _ in draws[skip:])
        streams = {name: _Stream(loader, draws[:skip].count(name)) for name, loader in self.loaders.items()}
        return ((name, streams[name].next()) for name in draws[skip:])

    def state_dict(self) -> dict[str, Any]:
        if self.pass_done or self._starts is None:
            return {
                "generators": {n: loader.generator.get_state() for n, loader in self.loaders.items()},
                "consumed": 0,
            }
        return {"generators": self._starts, "consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, generator_state in state["generators"].items():
            if name in self.loaders:  # a packed run's checkpoint of an earlier release holds every task's loader
                self.loaders[name].generator.set_state(generator_state)
        self._skip = state["consumed"]


class MultiTaskDataModule(L.LightningDataModule):
    """The tasks' datamodules as one: a `MultiTaskBatches` training stream, and one validation (test) loader per
    task, in task order (the test loaders of `test_tasks` only, so one task's checkpoint can be tested alone)."""

    def __init__(
        self, datamodules: Mapping[str, L.LightningDataModule], rule: str, *, seed: int, temperature: float
    ) -> None:
        super().__init__()
        self.datamodules = dict(datamodules)
        self.rule, self.seed, self.temperature = rule, seed, temperature
        self.test_tasks: list[str] = list(self.datamodules)

    @property
    def tasks(self) -> list[str]:
        return list(self.datamodules)

    @property
    def packed(self) -> bool:
        return self.rule == "packed"

    def eval_tasks(self, stage: str) -> list[str]:
        """The task of each evaluation loader: in a packed run one loader, every task on each batch."""
        if stage == "test":
            return self.test_tasks
        return [EVERY_TASK] if self.packed else self.tasks

    def _datamodule(self, task: str) -> L.LightningDataModule:
        return next(iter(self.datamodules.values())) if task == EVERY_TASK else self.datamodules[task]

    def prepare_data(self) -> None:
        for datamodule in self.datamodules.values():
            datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for datamodule in self.datamodules.values():
            datamodule.setup(stage)

    def train_dataloader(self) -> MultiTaskBatches:
        # A packed stream reads the first task's loader alone (the tasks share one data config).
        sources = list(self.datamodules.items())[: 1 if self.packed else None]
        return MultiTaskBatches(
            {name: dm.train_dataloader() for name, dm in sources},
            self.rule,
            seed=self.seed,
            temperature=self.temperature,
            epoch=lambda: self.trainer.current_epoch if self.trainer is not None else 0,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self._datamodule(task).val_dataloader() for task in self.eval_tasks("validate")]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._datamodule(task).test_dataloader() for task in self.test_tasks]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self.trainer is not None and self.trainer.training
        if training:
            task, (images, labels) = batch
        else:
            stage = "test" if self.trainer is not None and self.trainer.testing else "validate"
            task, (images, labels) = self.eval_tasks(stage)[dataloader_idx], batch
        return task, (self._datamodule(task).batch_transform(images, training=training), labels)
