"""The search space: Hydra's sweep override syntax read as Optuna distributions.

`choice(a, b)` is categorical; `range(start, stop, step)` has exactly the values Hydra's basic sweeper runs (an
integer grid, or a choice of the floats); `interval(low, high)` is continuous (integers with the `int` tag:
`tag(int, interval(1, 64))`); the `log` tag (`tag(log, interval(1e-4, 1e-2))`) samples on a log scale.
Anything that is not a sweep is a fixed override passed to every trial.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from lora_vision.errors import UserError


class SearchSpaceError(UserError, ValueError):
    """A search-space entry Optuna cannot sample."""


SCALAR = (str, int, float, bool, type(None))


def _choices(override: Override) -> CategoricalDistribution:
    choices = list(override.sweep_iterator(transformer=Transformer.encode))
    bad = [c for c in choices if not isinstance(c, SCALAR)]
    if bad:
        raise SearchSpaceError(
            f"{override.get_key_element()}: Optuna's choices must be scalars (str, int, float, bool, null), got "
            f"{bad[0]!r}; name each list or mapping by a preset or a config group option instead"
        )
    return CategoricalDistribution(choices)


def _range(override: Override, value: RangeSweep) -> BaseDistribution:
    # The values Hydra's own sweepers would run, so the search neither drops the last one (Hydra's range excludes
    # `stop`, and a float range's last value is `start + i * step`, not `stop - step`) nor adds one.
    if value.shuffle:
        return _choices(override)
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if not values:
        raise SearchSpaceError(
            f"{override.input_line}: the range has no values; it stops before `stop`, and a decreasing range needs "
            "a negative step"
        )
    if len(values) > 1 and all(isinstance(v, int) for v in values):
        # Integers are exact, so an ordered stepped distribution (which TPE models as such) has exactly these values.
        return IntDistribution(min(values), max(values), step=abs(values[1] - values[0]))
    # Floats: a categorical of Hydra's values, since Optuna rounds a stepped float grid its own way.
    return CategoricalDistribution(values)


def _interval(value: IntervalSweep) -> BaseDistribution:
    # Hydra reads an interval's ends as floats; the `int` tag asks for integers.
    log = "log" in value.tags
    if "int" in value.tags:
        return IntDistribution(int(value.start), int(value.end), log=log)
    return FloatDistribution(float(value.start), float(value.end), log=log)


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return _choices(override)
    if isinstance(value, RangeSweep):
        return _range(override, value)
    if isinstance(value, IntervalSweep):
        return _interval(value)
    raise SearchSpaceError(f"{override.input_line}: not a sweep Optuna can sample (use choice, range or interval)")


def parse_search_space(arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
    """Split override strings into the sampled distributions and the fixed overrides, by key.

    Later entries win, so a sweep given on the command line replaces the one of the search-space file.
    """
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return space, fixed


def as_override(key: str, value: Any) -> str:
    """`key=value` in the override grammar, for a value drawn from a distribution."""
    if isinstance(value, bool) or value is None:
        return f"{key}={'null' if value is None else str(value).lower()}"
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"
