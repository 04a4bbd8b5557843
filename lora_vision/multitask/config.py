"""The `multitask` block of the run config, read and checked before anything is built.

    multitask:
      tasks:                       # name -> a data config (a `data` group option), optional lora overrides and lr
        woof: {data: {...}, lora: {rank: 4}, lr: 3.0e-3}
        cifar: {data: {...}}
      sampling: proportional       # lora_vision.multitask.sampling
      temperature: 2.0             # for sampling=temperature
      sharing: independent         # independent | shared | shared_specific
      shared_rank: null            # the shared part's rank, for sharing=shared_specific

Sharing settings (what is ablated):
- `independent`: an adapter and a head per task, built from the run's `lora` settings with the task's `lora`
  overrides on top. Each task trains exactly as its single-task run would (same initial weights, data order and
  optimizer steps), so the run costs one backbone instead of one per task.
- `shared`: one adapter (the run's `lora` settings), trained by every task, and a head per task.
- `shared_specific`: a shared adapter of rank `shared_rank` plus a task-specific one per task, summed on each
  task's samples (task-agnostic and task-specific low-rank modules, as MTLoRA, Agiza et al. CVPR 2024). Each task's
  saved adapter is the two concatenated: a plain LoRA of rank shared_rank + the task's rank, with the same
  update.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_vision.config_checks import ConfigError
from lora_vision.methods import LoRA
from lora_vision.multitask.sampling import SAMPLING_RULES

SHARING = ("independent", "shared", "shared_specific")
# The adapter every task trains under sharing=shared or shared_specific.
SHARED = "shared"
TASK_KEYS = ("data", "lora", "lr", "warmup_epochs")
TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Settings that must agree between the shared and the task-specific parts, so that their sum is one plain LoRA.
SAME_IN_EVERY_PART = ("targets", "blocks", "dropout", "rank_pattern", "alpha_pattern")


@dataclass(frozen=True)
class Task:
    """One task: its data config, the settings of its own adapter (None: it has none), its learning rate and warmup
    (None: optim.warmup_epochs)."""

    name: str
    data: DictConfig
    adapter: LoRA | None
    lr: float
    warmup_epochs: float | None = None


@dataclass(frozen=True)
class MultiTaskSpec:
    tasks: dict[str, Task]
    sampling: str
    temperature: float
    sharing: str
    shared: LoRA | None
    shared_lr: float

    def adapters_of(self, task: str) -> list[str]:
        """The adapters a task's samples go through (the shared one first)."""
        shared = [SHARED] if self.shared is not None else []
        return shared + ([task] if self.tasks[task].adapter is not None else [])

    def saved_method(self, task: str) -> LoRA:
        """The method of the adapter saved for `task`: the shared and specific parts as one LoRA (the rank of both,
        alpha = rank: the scales are folded into B)."""
        parts = [self.shared] if self.shared is not None else []
        parts += [self.tasks[task].adapter] if self.tasks[task].adapter is not None else []
        if len(parts) == 1:
            return parts[0]
        rank = sum(part.rank for part in parts)
        return LoRA(**{**parts[-1].settings.settings(), "rank": rank, "alpha": float(rank)})


def is_multitask(cfg: DictConfig) -> bool:
    block = cfg.get("multitask")
    return block is not None and bool(block.get("tasks"))


def _lora_settings(cfg: DictConfig) -> dict[str, Any]:
    settings = OmegaConf.to_container(cfg.lora, resolve=True)
    target = settings.pop("_target_", "")
    if not target.endswith(".LoRA"):
        raise ConfigError(
            f"lora._target_={target}: a multi-task run trains LoRA adapters (lora=lora, dora, rslora, pissa, "
            "loraplus); train a linear probe, BitFit or full fine-tuning one task at a time"
        )
    return settings


def _method(settings: Mapping[str, Any], where: str) -> LoRA:
    try:
        return LoRA(**settings)
    except Exception as err:
        raise ConfigError(f"{where}: {err}") from None


def read_spec(cfg: DictConfig) -> MultiTaskSpec:
    """The checked `multitask` block; every error names the key and the valid values."""
    block = cfg.multitask
    if block.sampling not in SAMPLING_RULES:
        raise ConfigError(f"multitask.sampling={block.sampling} is not a rule; valid: {', '.join(SAMPLING_RULES)}")
    if not isinstance(block.temperature, int | float) or block.temperature <= 0:
        raise ConfigError(f"multitask.temperature={block.temperature} must be a number > 0")
    if block.sharing not in SHARING:
        raise ConfigError(f"multitask.sharing={block.sharing} is not a setting; valid: {', '.join(SHARING)}")
    root = _lora_settings(cfg)
    shared = None
    if block.sharing == "shared":
        shared = _method(root, "lora")
    elif block.sharing == "shared_specific":
        if not isinstance(block.shared_rank, int) or block.shared_rank < 1:
            raise ConfigError(
                f"multitask.shared_rank={block.shared_rank}: sharing=shared_specific needs the shared part's rank, "
                "an integer >= 1"
            )
        shared = _method({**root, "rank": block.shared_rank}, "multitask.shared_rank")
        if shared.variant != "lora" or root.get("rank_pattern") or root.get("alpha_pattern"):
            raise ConfigError(
                f"sharing=shared_specific sums two adapters into one saved LoRA, which a {shared.variant} adapter "
                "cannot be (nor one with per-layer rank or alpha patterns); use lora=lora, or sharing=independent"
            )
    tasks = {name: _task(name, entry, root, block.sharing, cfg.optim.lr) for name, entry in block.tasks.items()}
    if block.sampling == "packed":
        _check_pack(tasks, block.sharing)
    return MultiTaskSpec(tasks, block.sampling, float(block.temperature), block.sharing, shared, cfg.optim.lr)


def _check_pack(tasks: Mapping[str, Task], sharing: str) -> None:
    """A pack trains independent tasks on one data stream: one data config, one adapter per task."""
    if sharing != "independent":
        raise ConfigError(
            f"multitask.sampling=packed trains independent points of a sweep on one data stream; multitask.sharing="
            f"{sharing} shares an adapter between them: use sharing=independent"
        )
    first, *others = tasks.values()
    for task in others:
        if task.data != first.data:
            differs = sorted(
                key for key in set(task.data) | set(first.data) if task.data.get(key) != first.data.get(key)
            )
            raise ConfigError(
                f"multitask.sampling=packed trains every task on the same batches, but multitask.tasks.{task.name}"
                f".data differs from multitask.tasks.{first.name}.data in {', '.join(differs)}: give the tasks one "
                "data config, or sample them with proportional, round_robin or temperature"
            )


def _task(name: str, entry: Any, root: dict[str, Any], sharing: str, lr: float) -> Task:
    where = f"multitask.tasks.{name}"
    if not TASK_NAME.match(name) or name == SHARED:
        raise ConfigError(f"{where}: a task name is letters, digits and _, starting with a letter, and not {SHARED!r}")
    if not isinstance(entry, DictConfig) or "data" not in entry:
        raise ConfigError(f"{where}: give the task's data (a data group option, e.g. /data@{where}.data: cifar10)")
    unknown = sorted(set(entry) - set(TASK_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a task key; valid: {', '.join(TASK_KEYS)}")
    own = OmegaConf.to_container(entry.lora, resolve=True) if entry.get("lora") else {}
    task_lr = entry.get("lr") or lr
    if not isinstance(task_lr, int | float) or task_lr <= 0:
        raise ConfigError(f"{where}.lr={task_lr} must be a number > 0")
    warmup = entry.get("warmup_epochs")
    if warmup is not None and (not isinstance(warmup, int | float) or warmup < 0):
        raise ConfigError(f"{where}.warmup_epochs={warmup} must be a number >= 0, or null for optim.warmup_epochs")
    if sharing == "shared":
        if own:
            raise ConfigError(
                f"{where}.lora: with multitask.sharing=shared every task trains the one shared adapter (the run's "
                "lora settings); give tasks their own adapters with sharing=independent or shared_specific"
            )
        return Task(name, entry.data, None, float(task_lr), warmup)
    adapter = _method({**root, **own}, f"{where}.lora")
    if sharing == "shared_specific":
        differs = [key for key in SAME_IN_EVERY_PART if key in own and own[key] != root.get(key)]
        if differs or adapter.variant != "lora":
            what = f"{where}.lora.{differs[0]}" if differs else f"{where}: a {adapter.variant} adapter"
            raise ConfigError(
                f"{what}: with sharing=shared_specific a task's part must match the shared part in "
                f"{', '.join(SAME_IN_EVERY_PART)} and be plain LoRA, so that the two save as one LoRA"
            )
    return Task(name, entry.data, adapter, float(task_lr), warmup)
