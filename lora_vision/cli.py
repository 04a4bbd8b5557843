"""The command line of `python -m lora_vision.train`: the spellings it accepts on top of Hydra's grammar, and the
checks that turn a mistake in it into one message (exit status 2) before Hydra starts a run.

Hydra's own reports of these mistakes exit with status 1 and give advice that misleads here: a misspelt key gets
"To append to your config use +lora.rnak=4", which the run would then refuse, and a sweep given without `-m`
(`+sweep=rank`) silently trains one run.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from hydra._internal.utils import get_args_parser
from hydra.core.config_loader import ConfigLoader
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, ValueType
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lora_vision.composition import ORDERED_GROUPS, compose, run_config_loader
from lora_vision.config_checks import OPEN_PREFIXES, ConfigError
from lora_vision.errors import user_errors_as_messages

PROG = "python -m lora_vision.train"

# `+exp=NAME` (append a group that is not in the defaults list) is how the project has always been called and what
# its documentation writes, but Hydra's spelling for a group the defaults list declares (ORDERED_GROUPS) is
# `exp=NAME`, and Hydra would refuse the `+`, so it is read as `exp=NAME`.
_APPENDS = tuple(f"+{group}=" for group in ORDERED_GROUPS)

# What OmegaConf.select returns for a key the config does not have (None is a value a key may hold).
_ABSENT = object()


def canonical_overrides(overrides: Sequence[str]) -> list[str]:
    """`overrides` with `+exp=`, `+sweep=` and `+debug=` written as Hydra expects for a declared group."""
    return [override[1:] if override.startswith(_APPENDS) else override for override in overrides]


def checked_command_line(argv: Sequence[str]) -> list[str]:
    """`argv` as Hydra is to read it, once `check_command_line` passes; a mistake exits with its message."""
    with user_errors_as_messages(PROG):
        check_command_line(argv)
    return canonical_overrides(argv)


def check_command_line(argv: Sequence[str]) -> None:
    """Raise ConfigError for an override Hydra cannot parse, a group option or key that does not exist (naming the
    closest ones and the valid ones), or a sweep without multirun (`-m`). A command line for another config, for help
    or for shell completion is left to Hydra, and so is one Hydra's own argument parser would refuse."""
    args, unknown = get_args_parser().parse_known_args(list(argv))
    if unknown or args.help or args.hydra_help or args.shell_completion or args.experimental_rerun:
        return
    if args.config_path or args.config_name or args.config_dir:
        return
    with run_config_loader() as loader:
        try:
            parsed = OverridesParser.create(config_loader=loader).parse_overrides(canonical_overrides(args.overrides))
        except OverrideParseException as err:
            raise ConfigError(str(err)) from None
        given = list(zip(parsed, args.overrides, strict=True))
        for override, shown in given:
            if _is_group(loader, override):
                _check_options(loader, override, shown)
        try:
            cfg = _compose_one_job(loader, given)
        except ConfigError:
            raise
        except ValueError:
            # Hydra refuses a malformed group override (`sweep=null`) with an exception of its own, and reports it.
            return
    multirun = args.multirun or cfg.hydra.mode == RunMode.MULTIRUN
    if not multirun and args.cfg is None and args.info is None:
        _check_no_sweep(given, argv)


def _is_group(loader: ConfigLoader, override: Override) -> bool:
    # As Hydra decides it: a name with config files under it is a group, unless the value is a mapping.
    return not isinstance(override.value(), dict) and bool(
        loader.get_group_options(override.key_or_group, results_filter=None)
    )


def _values(override: Override) -> list[str]:
    """The option names (or values) `override` gives, one per job for a sweep; none for a deletion or interval."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator()) if override.is_discrete_sweep() else []
    value = override.value()
    if value is None:
        return []
    return [str(item) for item in value] if isinstance(value, list) else [str(value)]


def _closest(word: str, candidates: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=3)


def _did_you_mean(close: Sequence[str]) -> str:
    return f"did you mean {' or '.join(close)}? " if close else ""


def _check_options(loader: ConfigLoader, override: Override, shown: str) -> None:
    group = override.key_or_group
    options = loader.get_group_options(group)
    for value in _values(override):
        if value not in options:
            raise ConfigError(
                f"{shown}: {group} has no option {value!r}; {_did_you_mean(_closest(value, options))}"
                f"the options of {group} are {', '.join(options)}"
            )


def _job_override(override: Override) -> str | None:
    """`override` as the first job of its sweep would have it (an interval sweep at its lower end)."""
    if not override.is_sweep_override():
        return override.input_line
    sweep = override.value()
    values = _values(override) or ([str(sweep.start)] if isinstance(sweep, IntervalSweep) else [])
    return f"{override.get_key_element()}={values[0]}" if values else None


def _compose_one_job(loader: ConfigLoader, given: list[tuple[Override, str]]) -> DictConfig:
    job = [_job_override(override) for override, _ in given]
    try:
        return compose(loader, [line for line in job if line is not None])
    except ConfigCompositionException as err:
        # Group options are valid by now: compose them alone and find the key override that does not fit.
        groups = [line for (override, _), line in zip(given, job, strict=True) if line and _is_group(loader, override)]
        try:
            base = compose(loader, groups)
        except ConfigCompositionException:
            raise ConfigError(_hydra_message(err)) from None
        for override, shown in given:
            if not _is_group(loader, override) and (problem := _key_problem(loader, base, override, shown)):
                raise ConfigError(problem) from None
        raise ConfigError(_hydra_message(err)) from None


def _hydra_message(err: BaseException) -> str:
    parts = []
    cause: BaseException | None = err
    while cause is not None:
        if str(cause).strip():
            parts.append(str(cause).strip())
        cause = cause.__cause__
    return "\n".join(parts)


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)


def _key_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for name, child in node.items():
            yield f"{prefix}{name}"
            yield from _key_paths(child, f"{prefix}{name}.")


def _key_problem(loader: ConfigLoader, cfg: DictConfig, override: Override, shown: str) -> str | None:
    """What is wrong with the key of `override` in `cfg` (the config it applies to), or None."""
    key = override.key_or_group
    exists = _select(cfg, key) is not _ABSENT
    if override.is_add() and exists and not isinstance(override.value(), dict | list):
        return f"{shown}: {key} is in the config already; set it without the +: {shown[1:]}"
    if override.is_add() or override.is_force_add() or exists:
        return None
    # The deepest mapping above the key: the keys it has are the valid ones.
    parent = key
    while parent and not isinstance(_select(cfg, parent), DictConfig):
        parent = parent.rpartition(".")[0]
    node = _select(cfg, parent) if parent else cfg
    names = [str(name) for name in node if not str(name).startswith("_") and (parent or name != "hydra")]
    rest = key[len(parent) + 1 :] if parent else key
    if parent:
        where = f"{parent} has no key {rest!r}"
        valid = f"the keys of {parent} are {', '.join(names)}"
        close = [f"{parent}.{name}" for name in _closest(rest.partition(".")[0], names)]
    else:
        # A top-level name may be a misspelt group, or a key that belongs under a group (lr for optim.lr).
        where = f"there is no key or config group {rest!r}"
        valid = f"the top-level keys are {', '.join(names)}"
        tree = OmegaConf.to_container(cfg, resolve=False)
        candidates = [*loader.list_groups(""), *_key_paths({k: v for k, v in tree.items() if k != "hydra"})]
        close = [path for path in candidates if path.rpartition(".")[2] == key] or _closest(key, candidates)
    action = "delete" if override.is_delete() else "set"
    # Under a pass-through prefix an unlisted name may be a real argument (trainer.profiler), unless it is a typo.
    passed_on = (
        f"; arguments that the config does not list are added with +: +{shown}"
        if (key + ".").startswith(OPEN_PREFIXES) and not override.is_delete() and not close
        else ""
    )
    return f"{shown}: {where}, so there is nothing to {action}; {_did_you_mean(close)}{valid}{passed_on}"


def _check_no_sweep(given: list[tuple[Override, str]], argv: Sequence[str]) -> None:
    for override, shown in given:
        named_sweep = override.key_or_group == "sweep" and not override.is_delete() and override.value() is not None
        if not (override.is_sweep_override() or named_sweep):
            continue
        alternatives = ""
        if override.value_type == ValueType.SIMPLE_CHOICE_SWEEP:
            key, _, value = shown.partition("=")
            alternatives = f" (a list value is written {key}=[{value}], a string with commas quoted: {key}='{value}')"
        raise ConfigError(
            f"{shown} is a sweep, and a sweep runs only in a multirun: add -m, as in "
            f"{PROG} -m {shlex.join(argv)}{alternatives}; without -m it would train one run"
        )
