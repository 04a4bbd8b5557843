"""Command-line spellings the entry points accept on top of Hydra's grammar."""

from __future__ import annotations

from collections.abc import Sequence

# Groups declared `null` in conf/train.yaml's defaults list, so that they merge in that list's order (experiment,
# then sweep, then debug) whatever the order on the command line. Hydra's own spelling for such a group is
# `exp=NAME`; `+exp=NAME` (append a group that is not in the defaults list) is how the project has always been
# called and what its documentation writes, and Hydra would refuse it for a declared group, so it is read as
# `exp=NAME`.
ORDERED_GROUPS = ("exp", "sweep", "debug")


def canonical_overrides(overrides: Sequence[str]) -> list[str]:
    """`overrides` with `+exp=`, `+sweep=` and `+debug=` written as Hydra expects for a declared group."""
    appends = tuple(f"+{group}=" for group in ORDERED_GROUPS)
    return [override[1:] if override.startswith(appends) else override for override in overrides]
