"""Checks of the composed run config, so a bad value fails before any model is built or data is read.

Unknown keys and group options on the command line are refused before Hydra starts (`lora_vision.cli`), data keys
of another dataset by `lora_vision.composition`; these checks cover values, keys added with `+` that nothing reads,
and accelerators the machine lacks. LoRA settings are checked by the method classes themselves
(`lora_vision.methods`), data options by the datamodules. Options that this machine runs far slower than without
them are not errors: `warn_slow_options` names them, with the measured cost and the fix, and the run goes on.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from lora_vision.errors import UserError

log = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the key, the bad value and what is valid."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _fraction_below_one(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1


def _betas(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and all(_fraction_below_one(b) for b in value)


def _epochs(value: Any) -> bool:
    return _is_int(value) and (value >= 1 or value == -1)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


# key -> (check, description of the valid values)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_non_negative_int, "an integer >= 0"),
    "optim.lr": (_positive, "a number > 0"),
    "optim.weight_decay": (_non_negative, "a number >= 0"),
    "optim.betas": (_betas, "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    "optim.warmup_epochs": (_non_negative, "a number of epochs >= 0 (fractions allowed)"),
    "optim.min_lr": (_non_negative, "a number >= 0"),
    "module.label_smoothing": (_fraction_below_one, "a number in [0, 1)"),
    "data.image_size": (_positive_int, "an integer number of pixels > 0"),
    "data.crop_pct": (_optional(lambda v: _positive(v) and v <= 1), "null or a number in (0, 1]"),
    "data.batch_size": (_positive_int, "an integer > 0"),
    "trainer.max_epochs": (_epochs, "an integer >= 1 (or -1 with trainer.max_steps)"),
    "trainer.accumulate_grad_batches": (_positive_int, "an integer > 0"),
    "trainer.gradient_clip_val": (_optional(_positive), "null or a number > 0"),
    "model.num_classes": (_optional(_positive_int), "null (from the data) or an integer > 0"),
    "objective.param_penalty": (_non_negative, "a number >= 0 (accuracy per tenfold increase in parameters)"),
}


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value among RULES and the cross-key constraints."""
    for key, (check, valid) in RULES.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not check(value):
            raise ConfigError(f"{key}={value!r} is invalid: expected {valid}")
    max_epochs, warmup = cfg.trainer.max_epochs, cfg.optim.warmup_epochs
    if max_epochs > 0 and warmup >= max_epochs:
        # Experiments set their warmup for their own length (10 epochs of 100 for VTAB-1k), so a shorter run asked
        # for on the command line (trainer.max_epochs=1) meets this first; the message gives the setting to add.
        raise ConfigError(
            f"optim.warmup_epochs={warmup!r} is invalid: the warmup must be shorter than trainer.max_epochs="
            f"{max_epochs}; add optim.warmup_epochs=0 (no warmup) or a value below {max_epochs} (fractions allowed, "
            f"e.g. optim.warmup_epochs={max_epochs / 10:g})"
        )
    if max_epochs == -1 and cfg.trainer.get("max_steps", -1) in (None, -1):
        raise ConfigError("trainer.max_epochs=-1 is invalid without trainer.max_steps: training would never end")


# Where a key added with `+key=value` is read: Trainer arguments, timm model kwargs, extra callbacks and loggers
# (each entry with a `_target_`), and Hydra's own settings. Everywhere else every key the framework reads is in the
# config already, so an added one would be silently ignored (or fail deep inside a constructor).
# multitask.tasks.: a task is a new key of its own (+multitask.tasks.NAME.data=...).
OPEN_PREFIXES = ("trainer.", "model.kwargs.", "callbacks.", "logger.", "hydra.", "multitask.tasks.")


def check_appended_keys(overrides: Sequence[str], groups: Collection[str], cfg: DictConfig) -> None:
    """Raise ConfigError for a `+key=value` override outside OPEN_PREFIXES, naming the closest existing keys.

    `groups` are the config groups of the composition (Hydra's runtime choices): `+group=option` selects a config
    and is not a key.
    """
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if not override.is_add() or key in groups or "/" in key or (key + ".").startswith(OPEN_PREFIXES):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        siblings = [name for name in node if name != leaf] if isinstance(node, DictConfig) else []
        close = [f"{parent}.{name}" if parent else name for name in difflib.get_close_matches(leaf, siblings, n=3)]
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(
            f"+{key}={override.value()!r} adds a key that lora_vision does not read; {hint}Existing keys take no +, "
            f"and keys can be added only under {', '.join(OPEN_PREFIXES)}"
        )


def check_accelerator(cfg: DictConfig) -> None:
    """Raise ConfigError when the config asks for a GPU this machine does not have, before any download."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is available on this machine; train on the CPU with "
            "trainer=cpu (or debug=limit for a quick check)"
        )


# Where Linux lists the CPU's model name and instruction-set flags. Not torch.backends.cpu.get_cpu_capability():
# it names the vector width ATen dispatches to ("AVX2", "AVX512"), the same "AVX512" on CPUs with and without bf16
# instructions (and lowered by ATEN_CPU_CAPABILITY), so it cannot tell whether bf16 is native.
CPUINFO = Path("/proc/cpuinfo")
# Instructions that compute in bf16: AVX-512 BF16 (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids and
# later). Without either, every bf16 op is emulated through fp32 conversions.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """A CPU's model name and instruction-set flags, as /proc/cpuinfo lists them."""

    model: str
    flags: frozenset[str]


def read_cpuinfo() -> CpuInfo | None:
    """The first core's model name and flags; None without /proc/cpuinfo (macOS, Windows) or without a `flags`
    line in it (ARM lists `Features`), where a guess could warn about a CPU that runs bf16 well."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "flags" not in fields:
        return None
    return CpuInfo(fields.get("model name", "unnamed CPU"), frozenset(fields["flags"].split()))


def _runs_on_cpu(cfg: DictConfig) -> bool:
    accelerator = cfg.trainer.get("accelerator", "auto")
    gpu_available = torch.cuda.is_available() or torch.backends.mps.is_available()
    return accelerator == "cpu" or (accelerator == "auto" and not gpu_available)


def warn_slow_options(cfg: DictConfig) -> None:
    """Log a warning, with the measured cost and the fix, for each option that costs a CPU run more time than it
    saves: bf16 on a CPU without native bf16, and torch.compile. Not an error: the run goes on as asked."""
    if not _runs_on_cpu(cfg):
        return
    precision = str(cfg.trainer.get("precision", "32-true"))
    cpu = read_cpuinfo() if precision.startswith("bf16") else None
    if cpu is not None and not cpu.flags & set(NATIVE_BF16_FLAGS):
        # `python -m lora_vision.bench --options` (rank 8, fp32 baseline): on 2 cores of an AMD EPYC (AVX2, no
        # AVX-512) bf16 autocast ran at 0.026x and 0.074x the fp32 speed; on a Xeon with AVX-512 BF16 at 1.64x
        # (ViT-S/16 q,v) and 1.52x (ResNet-50), experiments/benchmarks/results.md.
        log.warning(
            f"trainer.precision={precision} will be slow on this CPU ({cpu.model}): it lacks the native bf16 "
            f"instructions ({' and '.join(NATIVE_BF16_FLAGS)} flags), so every bf16 op is emulated. In this "
            "project's benchmark bf16 autocast ran 14-38x slower than fp32 on such a CPU (an AMD EPYC with AVX2), "
            "against 1.5-1.6x faster on a Xeon with AVX-512 BF16. Fix: trainer.precision=32-true"
        )
    if cfg.perf.get("compile", False):
        # Per step, in `python -m lora_vision.bench --options` on 2 Xeon cores (experiments/benchmarks/results.md):
        # ViT-S/16 q,v 830 -> 809 ms (1.03x, within noise), ResNet-50 3x3 convs 602 -> 507 ms (1.19x).
        log.warning(
            "perf.compile on the CPU: the first steps pay the compilation, and in this project's CPU benchmark "
            "compiled steps ran at only 1.03x "
            "(ViT-S/16 q,v) and 1.19x (ResNet-50) the speed of eager ones (experiments/benchmarks/results.md), so "
            "compile pays only on long runs. Fix: perf.compile=false"
        )
