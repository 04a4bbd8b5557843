"""A training DataLoader whose position within an epoch survives a checkpoint, for exact mid-epoch resume.

Lightning restores the weights, optimizer, schedule and loop counters from a checkpoint, but the position inside
an epoch only for loaders that implement its `state_dict`/`load_state_dict` protocol; a plain DataLoader would
start the interrupted epoch over with a different shuffle. `lora_vision.resume.ResumeCheckpoint` feeds `consumed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader


class _SkipFirst:
    """A batch sampler without its first `skip` batches; the full order is still drawn, so the generator advances
    exactly as in an uninterrupted pass."""

    def __init__(self, batches: Iterable[Any], skip: int) -> None:
        self.batches = batches
        self.skip = skip

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.batches)
        for _ in range(self.skip):
            next(iterator, None)
        yield from iterator

    def __len__(self) -> int:
        return max(len(self.batches) - self.skip, 0)  # type: ignore[arg-type]


@runtime_checkable
class TracksPosition(Protocol):
    """A training loader told how far into its pass training got (`consumed` batches; `pass_done` at its end)."""

    consumed: int
    pass_done: bool


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position within a pass survives a checkpoint (Lightning's `state_dict` protocol).

    `consumed` is set by `ResumeCheckpoint` from Lightning's own batch counter: the loader itself has already
    yielded one batch more than was trained on (Lightning prefetches one to detect the last batch).
    """

    _pass_start: torch.Tensor | None = None
    _skip: int = 0
    consumed: int = 0
    pass_done: bool = False

    @property
    def _index_sampler(self) -> Any:
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip) if self._skip else sampler

    def __iter__(self) -> Any:
        if self.generator is not None:
            self._pass_start = self.generator.get_state()
        self.consumed, self.pass_done = self._skip, False
        try:
            return super().__iter__()
        finally:
            self._skip = 0

    def state_dict(self) -> dict[str, Any]:
        # A finished pass resumes with the next one, whose order the generator's current state draws.
        if self.pass_done or self._pass_start is None:
            state = None if self.generator is None else self.generator.get_state()
            return {"generator": state, "consumed": 0}
        return {"generator": self._pass_start, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])
        self._skip = state["consumed"]
