"""Which modules of a model get adapters: patterns, named presets, q/k/v selectors and block ranges.

A target is one of
- a preset name (see `PRESETS`), e.g. ``"qv"`` or ``"conv3x3"``;
- a glob over module names, e.g. ``"blocks.*.mlp.fc1"`` (``*`` also crosses dots);
- a regular expression prefixed with ``re:``, e.g. ``"re:layer[34]\\..*conv2"`` (full match);
- either of the last two followed by ``:q,v`` (any of q, k, v) to adapt only those projections of a fused
  ``qkv`` Linear.

Only `nn.Linear` and `nn.Conv2d` modules (and subclasses) can be adapted. Wildcards never match the classifier
head: name it exactly (or use the ``classifier`` preset) to adapt it. Every target must match at least one
module, so a typo fails loudly instead of silently training fewer adapters.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from lora_vision.lora.adapter import QKV_SLOTS
from lora_vision.lora.errors import LoRAConfigError
from lora_vision.lora.layers import DEFAULT_ADAPTER, LoRALayer

ADAPTABLE = (nn.Linear, nn.Conv2d)

# The first block-like index in a module name: ViT/EfficientNet `blocks.N`, Swin `layers.N`,
# ConvNeXt `stages.N`, ResNet `layerN`.
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:(?:blocks|layers|stages)\.(\d+)|layer(\d+))(?:\.|$)")
_SELECTOR = re.compile(r"^(.*):([qkv](?:,[qkv])*)$")


def _is_conv(kernel: tuple[int, int] | None = None) -> Callable[[nn.Module], bool]:
    return lambda m: isinstance(m, nn.Conv2d) and (kernel is None or tuple(m.kernel_size) == kernel)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear)


@dataclass(frozen=True)
class Preset:
    """A named target set: patterns, plus an optional module filter."""

    patterns: tuple[str, ...]
    description: str
    where: Callable[[nn.Module], bool] | None = None


CLASSIFIER = "classifier"

PRESETS: dict[str, Preset] = {
    "qv": Preset(("*attn.qkv:q,v",), "ViT: Wq and Wv inside each fused qkv (LoRA paper default)"),
    "qkv": Preset(("*attn.qkv:q,k,v",), "ViT: Wq, Wk and Wv, each with its own adapter"),
    "qkv_fused": Preset(("*attn.qkv",), "ViT: the whole fused qkv Linear with one shared A (as PEFT does)"),
    "attn": Preset(("*attn.qkv:q,k,v", "*attn.proj"), "ViT: Wq, Wk, Wv and the output projection Wo"),
    "mlp": Preset(("*mlp.fc1", "*mlp.fc2"), "ViT: both MLP layers"),
    "all_linear": Preset(("*",), "any model: every Linear except the classifier", _is_linear),
    "all_convs": Preset(("*",), "any CNN: every Conv2d (stem, depthwise and pointwise too)", _is_conv()),
    "conv3x3": Preset(("*",), "any CNN: every 3x3 Conv2d (ResNet's spatial convs)", _is_conv((3, 3))),
    "conv1x1": Preset(("*",), "any CNN: every 1x1 (pointwise) Conv2d", _is_conv((1, 1))),
    "resnet_last_stage": Preset(("layer4.*",), "ResNet: every conv of stage 4", _is_conv()),
    "resnet_last_two_stages": Preset(("layer3.*", "layer4.*"), "ResNet: every conv of stages 3 and 4", _is_conv()),
    CLASSIFIER: Preset((), "any model: the classifier head (found via timm's get_classifier())"),
}


@dataclass(frozen=True)
class Target:
    """One resolved module to adapt; `slots` picks q/k/v of a fused qkv (None = the whole layer)."""

    name: str
    module: nn.Module
    slots: tuple[int, ...] | None = None


def classifier_name(model: nn.Module) -> str | None:
    """Name of the classifier head via timm's `get_classifier()`; None if the model has none."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if head is None or isinstance(head, nn.Identity):
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def block_index(name: str) -> int | None:
    """The block (ViT) or stage (CNN) index a module belongs to, or None for stem/head modules."""
    match = _BLOCK_INDEX.search(name)
    return None if match is None else int(match.group(1) or match.group(2))


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear/Conv2d modules by name; a layer that already carries adapters stands for its base (it takes more)."""
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, LoRALayer):
            skip.append(name + ".")
            found[name] = module.base
        elif isinstance(module, ADAPTABLE):
            found[name] = module
    return found


def select_blocks(spec: int | str | Sequence[int] | None, available: Sequence[int]) -> set[int] | None:
    """Interpret a block restriction against the model's block indices.

    `None` keeps every module. A string `"a:b"` is a Python slice over the sorted block indices (`"-4:"` = the
    last four blocks). An int or a list of ints names indices as they appear in module names (`[3, 4]` = ResNet
    `layer3`, `layer4`); negative ints count from the end (`-1` = the last block).
    """
    if spec is None:
        return None
    indices = sorted(set(available))
    if not indices:
        raise LoRAConfigError(f"lora blocks={spec!r} given, but the model has no numbered blocks or stages")
    if isinstance(spec, str) and ":" in spec:
        try:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            chosen = indices[slice(*parts)]
        except (TypeError, ValueError):
            raise LoRAConfigError(f"lora blocks={spec!r} is not a slice like '-4:' or '2:6'") from None
    else:
        try:
            wanted = [int(spec)] if isinstance(spec, int | str) else [int(i) for i in spec]
        except (TypeError, ValueError):
            raise LoRAConfigError(f"lora blocks={spec!r} must be a slice string or a list of ints") from None
        bad = [i for i in wanted if (i < 0 and -i > len(indices)) or (i >= 0 and i not in indices)]
        if bad:
            raise LoRAConfigError(f"lora blocks {bad} do not exist; the model's blocks are {indices}")
        chosen = [indices[i] if i < 0 else i for i in wanted]
    if not chosen:
        raise LoRAConfigError(f"lora blocks={spec!r} selects none of the model's blocks {indices}")
    return set(chosen)


def _matcher(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            raise LoRAConfigError(f"target {pattern!r} is not a valid regular expression: {err}") from None
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _parse_slots(pattern: str) -> tuple[str, tuple[int, ...] | None]:
    match = _SELECTOR.match(pattern)
    if match is None:
        return pattern, None
    return match.group(1), tuple(sorted({QKV_SLOTS.index(s) for s in match.group(2).split(",")}))


def _is_fused_qkv(name: str, module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] == "qkv" and module.out_features % len(QKV_SLOTS) == 0
    )


def _expand(targets: str | Iterable[str], head: str | None) -> list[tuple[str, str, Preset | None]]:
    """(label, pattern, preset) for every pattern; label is what the user wrote, for error messages."""
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise LoRAConfigError(f"lora targets is empty; give patterns or presets from {sorted(PRESETS)}")
    expanded = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise LoRAConfigError(f"lora target {item!r} must be a non-empty string")
        preset = PRESETS.get(item)
        if preset is None:
            expanded.append((item, item, None))
        elif item == CLASSIFIER:
            if head is None:
                raise LoRAConfigError("target 'classifier': this model has no classifier head")
            expanded.append((item, head, preset))
        else:
            expanded.extend((item, pattern, preset) for pattern in preset.patterns)
    return expanded


def _matching_names(
    raw_pattern: str, preset: Preset | None, candidates: dict[str, nn.Module], head: str | None
) -> list[str]:
    pattern, _ = _parse_slots(raw_pattern)
    matches_name = _matcher(pattern)
    return [
        n
        for n, module in candidates.items()
        if matches_name(n)
        and (n != head or raw_pattern == head)
        and (preset is None or preset.where is None or preset.where(module))
    ]


def _no_match_hint(pattern: str, preset: Preset | None, candidates: dict[str, nn.Module], head: str | None) -> str:
    if preset is not None:
        fitting = [
            name
            for name, p in PRESETS.items()
            if name != CLASSIFIER and all(_matching_names(x, p, candidates, head) for x in p.patterns)
        ]
        return f"presets that fit this model: {', '.join(fitting) or 'none'}"
    names = list(candidates)
    close = difflib.get_close_matches(pattern.split(":")[0], names, n=5, cutoff=0.4)
    shown = close or names[:12]
    more = "" if close or len(names) <= 12 else f" ... ({len(names)} in all)"
    return (
        f"{'closest module names' if close else 'adaptable modules'}: {', '.join(shown)}{more}; "
        f"presets: {', '.join(PRESETS)}"
    )


def resolve_targets(
    model: nn.Module,
    targets: str | Iterable[str],
    blocks: int | str | Sequence[int] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> list[Target]:
    """Resolve targets to modules in model order, for an adapter named `adapter_name`. Raises `LoRAConfigError`
    without touching the model; a target that already holds an adapter of that name is one."""
    candidates = adaptable_modules(model)
    names = list(candidates)
    head = classifier_name(model)
    chosen_blocks = select_blocks(blocks, [i for n in names if (i := block_index(n)) is not None])
    selected: dict[str, tuple[int, ...] | None] = {}
    for label, raw_pattern, preset in _expand(targets, head):
        slots = _parse_slots(raw_pattern)[1]
        hits = _matching_names(raw_pattern, preset, candidates, head)
        where = f"lora.targets entry {label!r}" + (f" ({preset.description})" if preset else "")
        if not hits:
            hint = _no_match_hint(raw_pattern, preset, candidates, head)
            raise LoRAConfigError(f"{where} matches no adaptable module of this model; {hint}")
        if chosen_blocks is not None:
            hits = [n for n in hits if block_index(n) in chosen_blocks]
            if not hits:
                raise LoRAConfigError(f"{where} matches no module in blocks {sorted(chosen_blocks)} ({blocks=})")
        for name in hits:
            layer = model.get_submodule(name)
            if isinstance(layer, LoRALayer) and adapter_name in layer.adapters:
                raise LoRAConfigError(
                    f"{name} already has a LoRA adapter named {adapter_name!r}; apply LoRA once per model, or give "
                    "another adapter its own name (adapter_name=...)"
                )
            if slots is not None and not _is_fused_qkv(name, candidates[name]):
                raise LoRAConfigError(
                    f"{where}: q/k/v selectors need a fused qkv Linear (name ending in 'qkv', out = 3 x dim), "
                    f"but {name} is {type(candidates[name]).__name__}"
                )
            if name in selected and (selected[name] is None) != (slots is None):
                raise LoRAConfigError(f"{name} is targeted both whole and as q/k/v slices; choose one")
            previous = selected.get(name) or ()
            selected[name] = None if slots is None else tuple(sorted(set(previous) | set(slots)))
    return [Target(name, candidates[name], selected[name]) for name in names if name in selected]


V = TypeVar("V")


def resolve_patterns(patterns: Mapping[str, V] | None, names: Sequence[str], what: str) -> dict[str, V]:
    """Per-module values from a {pattern: value} mapping over the targeted module names.

    Patterns are globs or ``re:`` expressions as for targets; where several match a module, the later key wins
    (so a general pattern can be followed by exceptions). A pattern that matches no targeted module is an error:
    it would otherwise silently leave those layers at the default.
    """
    resolved: dict[str, V] = {}
    for pattern, value in (patterns or {}).items():
        if not isinstance(pattern, str) or not pattern:
            raise LoRAConfigError(f"lora {what} keys must be module-name patterns, got {pattern!r}")
        matches = _matcher(pattern)
        hits = [name for name in names if matches(name)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.4)
            shown = ", ".join(close or names[:12]) + ("" if close or len(names) <= 12 else f" ... ({len(names)})")
            raise LoRAConfigError(
                f"lora {what} key {pattern!r} matches none of the targeted modules; "
                f"{'closest' if close else 'targeted'}: {shown}"
            )
        resolved.update(dict.fromkeys(hits, value))
    return resolved
