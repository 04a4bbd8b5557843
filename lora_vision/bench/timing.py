"""Timing several callables side by side: warm-up, rotating order, medians and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Stats:
    """Per-call time in milliseconds: median, quartiles, extremes, and how many samples they summarise."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    samples: int

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        ms = sorted(s * 1e3 for s in seconds)
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
        return cls(statistics.median(ms), q1, q3, ms[0], ms[-1], len(ms))

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def rotated(names: list[str], round_index: int) -> list[str]:
    """The order of round `round_index`: each name leads in turn, so none always runs right after another."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def time_alternating(
    calls: Mapping[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    steps: int = 1,
    sync: Callable[[], object] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Stats]:
    """Time each callable in `repeats` rounds of `steps` calls, the order rotating every round.

    Interleaving means a slow phase of a shared machine (another job, thermal throttling) hits every side
    alike instead of whichever happened to run then. `warmup` untimed rounds come first (allocator pools,
    optimizer state, oneDNN/cuDNN kernel choice). `sync` waits for queued device work around each sample.
    """
    if warmup < 0 or repeats < 1 or steps < 1:
        raise ValueError(f"need warmup >= 0, repeats >= 1, steps >= 1; got {warmup}, {repeats}, {steps}")
    names = list(calls)
    for round_index in range(warmup):
        for name in rotated(names, round_index):
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in rotated(names, round_index):
            sync()
            start = clock()
            for _ in range(steps):
                calls[name]()
            sync()
            samples[name].append((clock() - start) / steps)
    return {name: Stats.of(times) for name, times in samples.items()}
