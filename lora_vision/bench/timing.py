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


def _timed_rounds(
    calls: Mapping[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    steps: int,
    sync: Callable[[], object],
    clock: Callable[[], float],
) -> dict[str, list[float]]:
    """Seconds per call of each callable, one sample per timed round."""
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
    return samples


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
    samples = _timed_rounds(calls, warmup, repeats, steps, sync, clock)
    return {name: Stats.of(times) for name, times in samples.items()}


@dataclass(frozen=True)
class Runs:
    """Several runs of one side-by-side timing: the samples of all runs pooled, and each run's own medians (ms)."""

    pooled: dict[str, Stats]
    medians: list[dict[str, float]]

    def ratio(self, numerator: str, denominator: str) -> Spread | None:
        """numerator/denominator of the medians, run by run; None where either side was not timed."""
        if numerator not in self.pooled or denominator not in self.pooled:
            return None
        return Spread.of([run[numerator] / run[denominator] for run in self.medians])


def time_runs(
    calls: Mapping[str, Callable[[], object]],
    runs: int,
    warmup: int,
    repeats: int,
    steps: int = 1,
    sync: Callable[[], object] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> Runs:
    """`time_alternating` `runs` times in a row, each run with its warm-up and its own rotation, so that a ratio
    can be read run by run: one run's median ratio can still sit on one slow phase of the machine."""
    if runs < 1:
        raise ValueError(f"need runs >= 1; got {runs}")
    pooled: dict[str, list[float]] = {name: [] for name in calls}
    medians = []
    for _ in range(runs):
        samples = _timed_rounds(calls, warmup, repeats, steps, sync, clock)
        medians.append({name: statistics.median(times) * 1e3 for name, times in samples.items()})
        for name, times in samples.items():
            pooled[name] += times
    return Runs({name: Stats.of(times) for name, times in pooled.items()}, medians)


@dataclass(frozen=True)
class Spread:
    """A ratio measured in several runs: its minimum, median and maximum, and each run's value."""

    min: float
    median: float
    max: float
    runs: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(min(values), statistics.median(values), max(values), tuple(values))

    def as_dict(self) -> dict[str, float | list[float]]:
        return {"min": self.min, "median": self.median, "max": self.max, "runs": list(self.runs)}
