"""Hugging Face PEFT's adapter format: adapters trained here written for PEFT, and PEFT adapters read here.

A PEFT LoRA adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`; on a timm model it
loads with `PeftModel.from_pretrained(timm.create_model(name, num_classes=n), directory)`. What maps to what:

- a LoRA on a whole Linear or a Conv2d (groups=1): the same A and B (B as a 1x1 kernel for a Conv2d), with
  `lora_alpha` giving PEFT's scaling our scale, per layer through `rank_pattern` and `alpha_pattern`;
- adapters on slots of a fused `qkv` (q and v, say): exactly a LoRA of rank `r x slots` on the whole layer, A the
  slots' A stacked and B block-structured (each slot's B in its rows and its own rank columns, zeros elsewhere),
  `lora_alpha` scaled so that PEFT's scaling equals ours;
- each LoRA variant's part (rsLoRA's scale, DoRA's magnitude, PiSSA's initial factors): the variant's own
  `to_peft` / `from_peft` hooks and `peft_setting` (`lora_vision.lora.variants`); a variant without them is
  refused by name;
- the trained classifier head: `modules_to_save`.

Anything else (grouped or dilated convs, convs whose padding PEFT would not reproduce, BitFit biases, BatchNorm
statistics) is refused with the layer and the reason, never written approximately. Our export also writes
`lora_vision_adapter.json` (the adapter's own record), from which the import rebuilds the exact slot structure:
ours -> PEFT -> ours gives bit-identical factors. Without it, a PEFT adapter becomes whole-layer adapters.

Written for the format of PEFT >= 0.21 and < 1 (`PEFT_VERSIONS`), tested against the release constraints.txt pins.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from torch import Tensor, nn

from lora_vision.adapters.errors import AdapterMismatchError
from lora_vision.adapters.native import (
    FORMAT,
    apply_recorded_method,
    damaged_tensors_refused,
    load_onto_recorded_base,
    read_adapter_record,
)
from lora_vision.adapters.tensors import adapter_keys, contiguous_cpu
from lora_vision.errors import MissingInputError
from lora_vision.lora import LoRAConv2d, LoRALayer, LoRALinear, classifier_name, freeze_backbone, named_lora_layers
from lora_vision.lora.errors import PeftFormatError
from lora_vision.lora.variants import VARIANTS
from lora_vision.lora.variants.base import PeftForm
from lora_vision.models import build_model
from lora_vision.results import write_atomic

PEFT_CONFIG = "adapter_config.json"
PEFT_TENSORS = "adapter_model.safetensors"
# The lora_vision record of an exported adapter, beside PEFT's files.
SIDE_META = "lora_vision_adapter.json"
PEFT_VERSIONS = ">=0.21,<1"
# LoraConfig's default lora_alpha, for a config file that leaves it out.
PEFT_DEFAULT_ALPHA = 8
PREFIX = "base_model.model."
A_KEY, B_KEY, MAGNITUDE_KEY = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
# PEFT initialisations that change the base weights themselves: the adapter alone does not reproduce the model.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


@dataclass
class PeftLayer:
    """One adapted module in PEFT's terms: A (R, fan_in...), B (out, R[, 1, 1]), lora_alpha, DoRA magnitude."""

    a: Tensor
    b: Tensor
    alpha: float
    magnitude: Tensor | None


def _check_conv(name: str, conv: nn.Conv2d) -> None:
    """PEFT's Conv2d LoRA runs A as `Conv2d(in, r, kernel, stride, padding)`: nothing else of the geometry."""
    reasons = []
    if conv.groups != 1:
        reasons.append(f"groups={conv.groups} (PEFT's conv LoRA needs groups=1)")
    if conv.dilation != (1, 1):
        reasons.append(f"dilation={conv.dilation} (PEFT's lora_A conv is not dilated)")
    if conv.padding_mode != "zeros":
        reasons.append(f"padding_mode={conv.padding_mode!r} (PEFT's lora_A pads with zeros)")
    if type(conv) is not nn.Conv2d:
        reasons.append(f"{type(conv).__name__} pads at run time; PEFT's lora_A would use the static padding")
    if reasons:
        raise PeftFormatError(f"{name}: PEFT cannot represent this adapter exactly: {'; '.join(reasons)}")


def _slots(layer: LoRALayer) -> tuple[int, tuple[int, ...]]:
    """How many equal output slots the base layer has, and which of them the adapter covers."""
    return (layer.num_slots, layer.slots) if isinstance(layer, LoRALinear) else (1, (0,))


def _whole_layer_b(b: Tensor, num_slots: int, used: tuple[int, ...]) -> Tensor:
    """Slot-form B (S, out_s, k) as one whole-layer B: each slot's B in its rows and its own rank columns, zeros
    elsewhere."""
    out_s, k = b.shape[1], b.shape[2]
    full = b.new_zeros(num_slots * out_s, len(used) * k)
    for i, slot in enumerate(used):
        full[slot * out_s : (slot + 1) * out_s, i * k : (i + 1) * k] = b[i]
    return full


def _variant_hooks(name: str, layer: LoRALayer, form: PeftForm, export: bool) -> PeftForm:
    """`form` through the variants' `to_peft` hooks in order (`export`) or their `from_peft` hooks in reverse."""
    variants = layer.variants if export else reversed(layer.variants)
    try:
        for variant in variants:
            form = variant.to_peft(layer, form) if export else variant.from_peft(layer, form)
    except PeftFormatError as err:
        raise PeftFormatError(f"{name}: {err}") from None
    return form


def peft_settings(layer: LoRALayer) -> dict[str, Any]:
    """The entries of PEFT's config that `layer`'s variants need there."""
    return dict(variant.peft_setting for variant in layer.variants if variant.peft_setting is not None)


def to_peft_layer(name: str, layer: LoRALayer) -> PeftLayer:
    """`layer` as PEFT's whole-layer LoRA of rank R = slots x k, with `lora_alpha` giving PEFT our scale."""
    if isinstance(layer, LoRAConv2d):
        _check_conv(name, layer.base)
    if layer.merged:
        raise PeftFormatError(f"{name}: the adapter is merged into the base weight; unmerge it before exporting")
    form = _variant_hooks(name, layer, PeftForm(*layer._slot_factors(layer.lora_A, layer.lora_B)), export=True)
    a = form.a.detach()
    slots, k = a.shape[0], a.shape[1]
    num_slots, used = _slots(layer)
    full_b = _whole_layer_b(form.b.detach(), num_slots, used)
    full_a = a.reshape(slots * k, *layer.base.weight.shape[1:])
    magnitude = None
    if form.magnitude is not None:
        # PEFT's magnitude covers every output row; rows outside the adapted slots have a zero update there, so
        # their own weight norm leaves them unchanged.
        rows = layer.base.weight.detach().flatten(1).unflatten(0, (num_slots, -1)).norm(dim=-1)
        rows[list(used)] = form.magnitude.detach()
        magnitude = rows.flatten()
    if isinstance(layer, LoRAConv2d):
        full_b = full_b[..., None, None]
        magnitude = None if magnitude is None else magnitude[None, :, None, None]
    # PEFT scales by lora_alpha / R**rank_exponent and we by alpha / r**rank_exponent: written through the ratio
    # R / r, a whole-layer adapter keeps its alpha exactly.
    alpha = layer.alpha * (slots * k / layer.rank) ** form.rank_exponent
    if not math.isclose(alpha / (slots * k) ** form.rank_exponent, layer.scale, rel_tol=1e-9):
        raise PeftFormatError(
            f"{name}: PEFT's scaling lora_alpha / R**{form.rank_exponent} cannot give this adapter's scale "
            f"{layer.scale} (alpha {layer.alpha}, rank {layer.rank}, variants {layer.variant})"
        )
    return PeftLayer(full_a, full_b, alpha, magnitude)


@torch.no_grad()
def from_peft_layer(name: str, layer: LoRALayer, peft: PeftLayer) -> None:
    """Set `layer`'s factors (and its variants' parts) from PEFT's; refuse what its slot structure cannot hold."""
    b_full = peft.b.flatten(1)
    num_slots, used = _slots(layer)
    slots, rank = len(used), peft.a.shape[0]
    if rank % slots or b_full.shape[1] != rank:
        raise AdapterMismatchError(f"{name}: PEFT rank {rank} does not split into this adapter's {slots} slot(s)")
    k, out_s = rank // slots, b_full.shape[0] // num_slots
    b = torch.stack([b_full[s * out_s : (s + 1) * out_s, i * k : (i + 1) * k] for i, s in enumerate(used)])
    if not torch.equal(_whole_layer_b(b, num_slots, used), b_full):
        raise AdapterMismatchError(
            f"{name}: PEFT's B has non-zero entries outside the blocks of the {layer.parts} slot adapters (training "
            f"went on in PEFT); remove {SIDE_META} to load it as whole-layer adapters"
        )
    magnitude = None if peft.magnitude is None else peft.magnitude.flatten().unflatten(0, (num_slots, -1))[list(used)]
    form = _variant_hooks(name, layer, PeftForm(b, peft.a.reshape(slots, k, -1), magnitude), export=False)
    if form.magnitude is not None:
        raise AdapterMismatchError(
            f"{name}: PEFT holds a magnitude vector, which none of this adapter's variants takes"
        )
    slot_b, slot_a = layer._slot_factors(layer.lora_A, layer.lora_B)
    if form.a.shape != slot_a.shape or form.b.shape != slot_b.shape:
        raise AdapterMismatchError(
            f"{name}: PEFT rank {rank} does not match this adapter's {slots} slot(s) of rank {layer.rank}"
        )
    a_native, b_native = layer._native_factors(form.b, form.a)
    layer.lora_A.copy_(a_native)
    layer.lora_B.copy_(b_native)


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def peft_adapter(model: nn.Module, all_batchnorm_stats: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT's `adapter_config.json` content and `adapter_model.safetensors` tensors for an adapted `model`."""
    layers = named_lora_layers(model)
    if not layers:
        raise PeftFormatError("the model carries no LoRA adapters; PEFT's LoRA format holds only LoRA")
    converted = {name: to_peft_layer(name, layer) for name, layer in layers.items()}
    settings = {tuple(sorted(peft_settings(layer).items())) for layer in layers.values()}
    dropouts = {getattr(layer.dropout, "p", 0.0) for layer in layers.values()}
    if len(settings) > 1 or len(dropouts) > 1:
        raise PeftFormatError(
            f"PEFT's config has one variant setting and one dropout for all layers; these adapters mix them "
            f"(settings {[dict(s) for s in settings]}, dropouts {sorted(dropouts)})"
        )
    head = classifier_name(model)
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    saved_modules = set()
    for key in adapter_keys(model, all_batchnorm_stats):
        if any(key.startswith(name + ".") for name in layers):
            continue
        if head is None or not key.startswith(head + "."):
            raise PeftFormatError(
                f"the adapter also holds {key}, which PEFT's LoRA format cannot carry (only LoRA factors, DoRA "
                "magnitudes and the classifier head through modules_to_save)"
            )
        saved_modules.add(head)
        tensors[PREFIX + key] = state[key]
    for name, layer in converted.items():
        tensors[PREFIX + name + A_KEY] = layer.a
        tensors[PREFIX + name + B_KEY] = layer.b
        if layer.magnitude is not None:
            tensors[PREFIX + name + MAGNITUDE_KEY] = layer.magnitude
    ranks = {name: layer.a.shape[0] for name, layer in converted.items()}
    alphas = {name: layer.alpha for name, layer in converted.items()}
    rank, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "target_modules": sorted(converted),
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {name: r for name, r in ranks.items() if r != rank},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "lora_dropout": dropouts.pop(),
        **dict(settings.pop()),
        "modules_to_save": sorted(saved_modules) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config, contiguous_cpu(tensors)


def save_peft_adapter(model: nn.Module, directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write `model`'s adapters as a PEFT adapter directory, with `meta` (its lora_vision record) beside them."""
    directory = Path(directory)
    config, tensors = peft_adapter(model, meta.get("all_batchnorm_stats", False))
    config["base_model_name_or_path"] = meta["model_name"]
    write_atomic(directory / PEFT_TENSORS, safetensors.torch.save(tensors))
    write_atomic(directory / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    # Only lora_vision's own record rebuilds the exact structure (an adapter that came from PEFT has none).
    if meta.get("format") == FORMAT:
        write_atomic(directory / SIDE_META, json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return directory


def _directory(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def is_peft_adapter(path: str | Path) -> bool:
    return (_directory(path) / PEFT_CONFIG).is_file()


def peft_record(path: str | Path) -> dict[str, Any] | None:
    """The lora_vision record beside an exported PEFT adapter, checked as `adapter.json` is; None for an adapter
    made by PEFT."""
    file = _directory(path) / SIDE_META
    return read_adapter_record(file) if file.is_file() else None


def peft_meta(directory: Path) -> dict[str, Any]:
    """What is known of a PEFT adapter before it is loaded: its lora_vision record, or what its config says."""
    record = peft_record(directory)
    if record is not None:
        return record
    config = _read_config(directory)
    return {"model_name": config.get("base_model_name_or_path"), "model_kwargs": {}, "data": None}


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / PEFT_CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PeftFormatError(
            f"{directory / PEFT_CONFIG} is not valid JSON ({err}): if this is a truncated or damaged copy, copy it "
            "again from where it was made"
        ) from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{directory / PEFT_CONFIG} holds {type(config).__name__}, not a PEFT config object")
    return config


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not (directory / PEFT_TENSORS).is_file():
        raise MissingInputError(f"{directory} has {PEFT_CONFIG} but no {PEFT_TENSORS}")
    config = _read_config(directory)
    with damaged_tensors_refused(directory / PEFT_TENSORS):
        return config, safetensors.torch.load_file(directory / PEFT_TENSORS)


def _check_config(config: dict[str, Any], directory: Path) -> None:
    """Refuse PEFT settings lora_vision's LoRA layers do not reproduce."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (only LORA maps onto lora_vision's adapters)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"bias={config.get('bias')!r}, lora_bias={config.get('lora_bias')} (trained biases)")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=true (transposed Conv1D weights, not a timm layer)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        problems.append(
            f"init_lora_weights={init!r} changed the base weights too; convert it with PEFT's "
            "path_initial_model_for_weight_conversion first"
        )
    for key in ("layer_replication", "target_parameters"):
        if config.get(key):
            problems.append(f"{key}={config[key]!r}")
    if problems:
        raise PeftFormatError(f"{directory / PEFT_CONFIG}: unsupported PEFT settings: {'; '.join(problems)}")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """The value of the first pattern that matches module `name`, as PEFT's `get_pattern_key` matches: the key is
    a regular expression for the name's end (`qkv` matches `blocks.0.attn.qkv`)."""
    return next((value for key, value in patterns.items() if re.match(rf"(.*\.)?({key})$", name)), default)


def _peft_layers(config: dict[str, Any], tensors: dict[str, Tensor], head: str | None) -> dict[str, PeftLayer]:
    """The adapted modules in PEFT's tensors, with each one's lora_alpha; anything else must be the head."""
    names = sorted({key[len(PREFIX) : -len(A_KEY)] for key in tensors if key.endswith(A_KEY)})
    layers = {}
    for name in names:
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
        magnitude = tensors.get(PREFIX + name + MAGNITUDE_KEY)
        layers[name] = PeftLayer(tensors[PREFIX + name + A_KEY], tensors[PREFIX + name + B_KEY], alpha, magnitude)
    known = {PREFIX + name + suffix for name in names for suffix in (A_KEY, B_KEY, MAGNITUDE_KEY)}
    saved = tuple(f"{PREFIX}{module}." for module in config.get("modules_to_save") or ())
    for key in tensors:
        if key in known:
            continue
        if not key.startswith(saved) or head is None or not key.startswith(f"{PREFIX}{head}."):
            raise PeftFormatError(
                f"PEFT tensor {key} is neither a LoRA factor nor the classifier head's ({head}); lora_vision maps "
                "LoRA on Linear and Conv2d layers and the head in modules_to_save"
            )
    return layers


def _load_head(model: nn.Module, tensors: dict[str, Tensor], head: str | None) -> None:
    if head is None:
        return
    factor_keys = (A_KEY, B_KEY, MAGNITUDE_KEY)
    state = {
        key[len(PREFIX) :]: t
        for key, t in tensors.items()
        if key.startswith(f"{PREFIX}{head}.") and not key.endswith(factor_keys)
    }
    if state:
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise AdapterMismatchError(f"head tensors {unexpected} do not fit the model's {head}")
        model.get_submodule(head).requires_grad_(True)


def _whole_layer(name: str, base: nn.Module, peft: PeftLayer, config: dict[str, Any]) -> LoRALayer:
    """A whole-layer adapter for PEFT's LoRA on `base`, with the variants whose `peft_setting` the config sets."""
    variants = {
        variant.setting[0]: variant.setting[1]
        for variant in VARIANTS
        if variant.peft_setting is not None and config.get(variant.peft_setting[0]) == variant.peft_setting[1]
    }
    rank, dropout = peft.a.shape[0], float(config.get("lora_dropout", 0.0))
    if type(base) is nn.Linear:
        return LoRALinear(base, rank, peft.alpha, dropout, **variants)
    if isinstance(base, nn.Conv2d):
        _check_conv(name, base)
        return LoRAConv2d(base, rank, peft.alpha, dropout, **variants)
    raise PeftFormatError(f"{name} is a {type(base).__name__}; lora_vision adapts nn.Linear and nn.Conv2d layers")


def _model_name(config: dict[str, Any], model_name: str | None, directory: Path) -> str:
    name = model_name or config.get("base_model_name_or_path")
    if not name:
        raise PeftFormatError(
            f"{directory / PEFT_CONFIG} does not say which timm model it adapts (base_model_name_or_path is empty); "
            "set base_model_name_or_path there to the timm model name (e.g. vit_base_patch16_224.augreg_in21k), or "
            "pass model_name=... in Python"
        )
    return name.removeprefix("hf-hub:").removeprefix("timm/")


def load_peft_adapter(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Apply the PEFT adapter at `path` to the plain `base_model` in place, as lora_vision layers; return it in
    eval mode.

    With `lora_vision_adapter.json` (an adapter exported from here) the base is checked as for our own adapters and
    the recorded slot structure is rebuilt exactly; otherwise each PEFT LoRA becomes a whole-layer adapter.
    """
    directory = _directory(path)
    config, tensors = _read(directory)
    _check_config(config, directory)
    head = classifier_name(base_model)
    peft_layers = _peft_layers(config, tensors, head)
    meta = peft_record(directory)
    if meta is not None:
        apply_recorded_method(meta, base_model)
        layers = named_lora_layers(base_model)
        if sorted(peft_layers) != sorted(layers):
            raise AdapterMismatchError(
                f"PEFT adapts {sorted(set(peft_layers) - set(layers))[:5] or 'the same layers'} but the recorded "
                f"method builds {sorted(set(layers) - set(peft_layers))[:5] or 'the same layers'}"
            )
    else:
        layers = {}
        for name, peft in peft_layers.items():
            layers[name] = _whole_layer(name, base_model.get_submodule(name), peft, config)
            base_model.set_submodule(name, layers[name])
        freeze_backbone(base_model, train_head=False)
    for name, layer in layers.items():
        from_peft_layer(name, layer, peft_layers[name])
    _load_head(base_model, tensors, head)
    return base_model.eval()


def _peft_base(
    directory: Path,
    checkpoint: str | Path | None,
    pretrained: bool | None,
    model_name: str | None,
    model_kwargs: dict[str, Any] | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The base model a PEFT adapter without a lora_vision record names, and the record to return with it."""
    config, tensors = _read(directory)
    name = _model_name(config, model_name, directory)
    heads = [tensors.get(f"{PREFIX}{m}.weight") for m in config.get("modules_to_save") or ()]
    # The saved head's class count; without one, the model's default head.
    num_classes = next((int(t.shape[0]) for t in heads if t is not None), None)
    if num_classes is None:
        num_classes = timm.models.get_pretrained_cfg(name).num_classes
    use_pretrained = checkpoint is None if pretrained is None else pretrained
    kwargs = dict(model_kwargs or {})
    model = build_model(
        name, num_classes, pretrained=use_pretrained, checkpoint=checkpoint, kwargs=kwargs, zero_init_head=False
    )
    source = {"pretrained": use_pretrained, "checkpoint": None if checkpoint is None else str(checkpoint)}
    meta = {
        "model_name": name,
        "model_kwargs": kwargs,
        "num_classes": num_classes,
        "base_source": source,
        "method": {"peft": config},
        "data": None,
    }
    return model, meta


def load_peft_adapted_model(
    path: str | Path,
    checkpoint: str | Path | None = None,
    pretrained: bool | None = None,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model with the PEFT adapter at `path` in lora_vision layers, in eval mode, and its record.

    With `lora_vision_adapter.json` (an adapter exported from here) the recorded base is rebuilt, as for our own
    adapters. Otherwise the base is `timm.create_model(base_model_name_or_path or model_name, **model_kwargs)` with
    the saved head's class count, from pretrained weights or `checkpoint`.
    """
    load = partial(load_peft_adapter, _directory(path))
    return load_onto_peft_base(path, load, checkpoint, pretrained, model_name, model_kwargs)


def load_onto_peft_base(
    path: str | Path,
    load: Callable[[nn.Module], nn.Module],
    checkpoint: str | Path | None = None,
    pretrained: bool | None = None,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """`load(base)` on the base model of the PEFT adapter at `path` (see `load_peft_adapted_model`), and its record."""
    directory = _directory(path)
    meta = peft_record(directory)
    if meta is not None:
        return load_onto_recorded_base(meta, load, checkpoint, pretrained), meta
    # Building draws random numbers (the head, new factors before they are overwritten); the caller's stream stays.
    with torch.random.fork_rng(devices=[]):
        model, meta = _peft_base(directory, checkpoint, pretrained, model_name, model_kwargs)
        return load(model), meta
