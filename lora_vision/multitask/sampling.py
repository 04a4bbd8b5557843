"""Which task each training step of a multi-task epoch draws its batch from.

An epoch has as many steps as the tasks have training batches together, whatever the rule, so epochs, validation
and the learning-rate schedule keep the meaning they have in a single-task run:

- `proportional`: each task's batches exactly once per epoch, in a shuffled order (task t is drawn with
  probability n_t / sum n). Every task sees its data once per epoch, in the order its single-task run sees it.
- `round_robin`: the tasks in turn (t1, t2, t1, t2, ...): equal steps per task whatever their sizes.
- `temperature`: each step draws task t with probability proportional to n_t ** (1 / temperature), independently
  (Arivazhagan et al. 2019, arXiv:1907.05019): 1 is proportional in expectation, larger values move towards equal
  shares, so a small task is not drowned by a large one.
- `packed`: tasks that share one data config (the points of a sweep) train together, every step on the same batch
  of that data; an epoch has that data's batches.

A task drawn more often than it has batches starts another shuffled pass within the epoch; every epoch starts each
task afresh. The draws depend only on the rule, the sizes, the seed and the epoch, so a resumed run draws the same.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch

from lora_vision.errors import UserError

SAMPLING_RULES = ("proportional", "round_robin", "temperature", "packed")
# The step of a packed run: every task trains on the same batch.
EVERY_TASK = "*"


def task_draws(rule: str, sizes: Mapping[str, int], *, seed: int, epoch: int, temperature: float = 1.0) -> list[str]:
    """The task of every step of `epoch` (`sizes`: training batches per task, in task order)."""
    if rule not in SAMPLING_RULES:
        raise UserError(f"multitask.sampling={rule!r} is not a rule; valid: {', '.join(SAMPLING_RULES)}")
    names = list(sizes)
    if rule == "packed":
        return [EVERY_TASK] * next(iter(sizes.values()))
    steps = sum(sizes.values())
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if rule == "round_robin":
        return list(itertools.islice(itertools.cycle(names), steps))
    if rule == "proportional":
        pool = [name for name in names for _ in range(sizes[name])]
        return [pool[int(i)] for i in torch.randperm(steps, generator=generator)]
    weights = torch.tensor([sizes[name] ** (1.0 / temperature) for name in names], dtype=torch.float64)
    picks = torch.multinomial(weights, steps, replacement=True, generator=generator)
    return [names[int(i)] for i in picks]
