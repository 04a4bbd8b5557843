"""`LoraConfig`: every LoRA setting, typed and validated in one place.

`apply_lora`, the `lora` Hydra group's `LoRA` method, results files, adapter files and the report all read their
settings from these fields, so adding an option is one field here (and its use where the layers need it). A LoRA
variant (`lora_vision.lora.variants`) is switched on by a field's value: `dora=True`, `init="pissa"`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from lora_vision.lora.errors import LoRAConfigError, check_hyperparameters, is_positive_number
from lora_vision.lora.variants import VARIANTS, LoraVariant
from lora_vision.lora.variants.base import check_composable


def variant_name(variants: Iterable[str], loraplus: bool = False) -> str:
    """The LoRA family member: "lora", or its variants joined, e.g. "dora", "pissa+rslora", "loraplus"."""
    return "+".join([*variants, *(["loraplus"] if loraplus else [])]) or "lora"


def _pattern(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LoRAConfigError(f"lora.{key} must be a mapping of module-name pattern to value, got {value!r}")
    return dict(value)


@dataclass(frozen=True)
class LoraConfig:
    """The settings of LoRA adapters (see `apply_lora`); invalid values raise `LoRAConfigError` on construction.

    Attributes:
        rank: adapter rank r (>= 1, at most what each targeted layer allows).
        alpha: the update is scaled by alpha / r; None means alpha = r (scale 1).
        dropout: dropout probability on the adapter's input, in [0, 1).
        targets: preset names and/or module-name patterns (see `lora_vision.lora.targets`).
        blocks: restrict targets to blocks/stages, e.g. ``"-4:"`` (last four) or ``[3, 4]``.
        train_head: also train the classifier head (unless it is itself adapted).
        rslora: scale by alpha / sqrt(r) instead of alpha / r (Kalajdzievski, 2023).
        dora: weight-decomposed LoRA, a trained magnitude per output channel (Liu et al., 2024).
        init: "lora" (A Kaiming-uniform, B zero) or "pissa" (A, B from the top-r singular triplets of W0).
        rank_pattern, alpha_pattern: per-layer rank / alpha, keyed by module-name pattern (glob or ``re:``, as
            for targets); later keys win where several match; each must match a targeted module.
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): B trains with this multiple of the learning rate; the
            paper recommends about 16. None trains A and B alike.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: Sequence[str] = ("qv",)
    blocks: int | str | Sequence[int] | None = None
    train_head: bool = True
    rslora: bool = False
    dora: bool = False
    init: str = "lora"
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    loraplus_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        check_hyperparameters(self.rank, self.alpha, self.dropout)
        targets = [self.targets] if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, Sequence) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise LoRAConfigError(f"lora.targets must be a non-empty list of strings, got {self.targets!r}")
        variant_settings = {key: getattr(self, key) for key in VARIANT_FIELDS}
        check_variant_settings(variant_settings, "lora.")
        check_composable(_switched_on(variant_settings))
        if not isinstance(self.train_head, bool):
            raise LoRAConfigError(f"lora.train_head must be true or false, got {self.train_head!r}")
        ratio = self.loraplus_lr_ratio
        if ratio is not None and not is_positive_number(ratio):
            raise LoRAConfigError(f"lora.loraplus_lr_ratio must be a number > 0 or null, got {ratio!r}")
        blocks = list(self.blocks) if isinstance(self.blocks, Sequence) and not isinstance(self.blocks, str) else None
        # Lists, as a config file writes them (messages and results files show them so).
        normalised = {
            "targets": list(targets),
            "blocks": self.blocks if blocks is None else blocks,
            "alpha": None if self.alpha is None else float(self.alpha),
            "rank_pattern": _pattern(self.rank_pattern, "rank_pattern") or None,
            "alpha_pattern": _pattern(self.alpha_pattern, "alpha_pattern") or None,
            "loraplus_lr_ratio": None if ratio is None else float(ratio),
        }
        for key, value in normalised.items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> LoraConfig:
        """A config from a mapping (a Hydra node, an adapter file); an unknown key is a `LoRAConfigError`."""
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise LoRAConfigError(f"unknown LoRA settings {unknown}; valid: {list(SETTINGS)}")
        return cls(**settings)

    @property
    def variant(self) -> str:
        names = [v.name for v in VARIANTS if getattr(self, v.setting[0]) == v.setting[1]]
        return variant_name(names, loraplus=self.loraplus_lr_ratio is not None)

    def settings(self) -> dict[str, Any]:
        """Every field as plain Python values (lists, dicts): what adapter files store to rebuild the config."""
        return asdict(self)

    def describe(self) -> dict[str, Any]:
        """What results files record (train_head aside), with alpha resolved and the variant named."""
        values = self.settings()
        del values["train_head"]
        return {"variant": self.variant, **values, "alpha": float(self.rank if self.alpha is None else self.alpha)}


# The fields that switch variants on, with plain LoRA's values (their defaults).
VARIANT_FIELDS = tuple(dict.fromkeys(v.setting[0] for v in VARIANTS))
PLAIN = {f.name: f.default for f in fields(LoraConfig) if f.name in VARIANT_FIELDS}


def variant_choices(field: str) -> tuple[Any, ...]:
    """The values a variant field accepts: plain LoRA's and those that switch a variant on."""
    return (PLAIN[field], *(v.setting[1] for v in VARIANTS if v.setting[0] == field))


def check_variant_settings(settings: Mapping[str, Any], prefix: str = "") -> None:
    """A `LoRAConfigError` for a key that is no variant field or a value no variant (nor plain LoRA) takes."""
    for key, value in settings.items():
        if key not in PLAIN:
            raise LoRAConfigError(f"{prefix}{key} is not a LoRA variant setting; valid: {', '.join(VARIANT_FIELDS)}")
        valid = variant_choices(key)
        if isinstance(PLAIN[key], bool) and not isinstance(value, bool):
            raise LoRAConfigError(f"{prefix}{key} must be true or false, got {value!r}")
        if value not in valid:
            raise LoRAConfigError(f"{prefix}{key}={value!r} is not one of {', '.join(map(str, valid))}")


def _switched_on(settings: Mapping[str, Any]) -> list[type[LoraVariant]]:
    return [v for v in VARIANTS if settings.get(v.setting[0], PLAIN[v.setting[0]]) == v.setting[1]]


def active_variants(settings: Mapping[str, Any]) -> list[LoraVariant]:
    """New instances of the variants that `settings` (variant fields; missing ones plain) switch on; a
    `LoRAConfigError` for a value no variant takes or for variants that do not compose."""
    check_variant_settings(settings)
    variants = _switched_on(settings)
    check_composable(variants)
    return [v() for v in variants]


SETTINGS = tuple(f.name for f in fields(LoraConfig))
# The LoRA fields of a results file, in order (a baseline records them as null).
RECORDED = tuple(LoraConfig().describe())
