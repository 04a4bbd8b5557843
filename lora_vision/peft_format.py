"""Hugging Face PEFT's adapter format: adapters trained here written for PEFT, and PEFT adapters read here.

A PEFT LoRA adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`; on a timm model it
loads with `PeftModel.from_pretrained(timm.create_model(name, num_classes=n), directory)`. What maps to what:

- a LoRA on a whole Linear or a Conv2d (groups=1): the same A and B (B as a 1x1 kernel for a Conv2d); PEFT's
  scaling `lora_alpha / r` (rsLoRA: `/ sqrt(r)`, `use_rslora`) equals ours, per layer through `rank_pattern`
  and `alpha_pattern`;
- adapters on slots of a fused `qkv` (q and v, say): exactly a LoRA of rank `r x slots` on the whole layer, A the
  slots' A stacked and B block-structured (each slot's B in its rows and its own rank columns, zeros elsewhere),
  `lora_alpha` scaled so that PEFT's scaling equals ours;
- PiSSA's update `scale * (B A - B0 A0)`: exactly a LoRA of rank 2r with A = [A; A0] and B = [B, -B0];
- DoRA: PEFT's DoRA is the same function (magnitude over the detached per-output-channel norm of W0 + scale B A);
  the magnitude of rows no adapter touches is their own norm, which leaves them unchanged;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from lora_vision.adapters import FORMAT as ADAPTER_FORMAT
from lora_vision.adapters import (
    AdapterMismatchError,
    _check_base,
    _lora_layers,
    adapter_keys,
    load_adapted_model,
)
from lora_vision.errors import MissingInputError, UserError
from lora_vision.lora import LoRAConv2d, LoRALayer, LoRALinear
from lora_vision.lora.inject import freeze_backbone
from lora_vision.lora.targets import classifier_name
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


class PeftFormatError(UserError, ValueError):
    """An adapter that PEFT's format cannot carry exactly, or a PEFT adapter lora_vision cannot map."""


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


def _variant_names(layer: LoRALayer) -> set[str]:
    return {variant.name for variant in layer.variants}


def _blocks(layer: LoRALayer) -> tuple[Tensor, Tensor]:
    """Slot-form (B (S, out_s, k), A (S, k, fan_in)) with `scale * B @ A` the update, written without rounding."""
    a, b = layer.lora_A, layer.lora_B
    if "pissa" in _variant_names(layer):
        a_dim, b_dim = layer.rank_dims
        a = torch.cat([a, layer.pissa_A0], dim=a_dim)
        b = torch.cat([b, -layer.pissa_B0], dim=b_dim)
    return layer._slot_factors(a, b)


def _num_slots(layer: LoRALayer) -> tuple[int, tuple[int, ...]]:
    return (layer.num_slots, layer.slots) if isinstance(layer, LoRALinear) else (1, (0,))


def to_peft_layer(name: str, layer: LoRALayer, use_rslora: bool) -> PeftLayer:
    """`layer` as PEFT's whole-layer LoRA of rank R = slots x k, with `lora_alpha` giving PEFT our scale."""
    if isinstance(layer, LoRAConv2d):
        _check_conv(name, layer.base)
    if layer.merged:
        raise PeftFormatError(f"{name}: the adapter is merged into the base weight; unmerge it before exporting")
    b, a = _blocks(layer)
    slots, k = a.shape[0], a.shape[1]
    num_slots, used = _num_slots(layer)
    out_s = b.shape[1]
    full_b = b.new_zeros(num_slots * out_s, slots * k)
    for i, slot in enumerate(used):
        full_b[slot * out_s : (slot + 1) * out_s, i * k : (i + 1) * k] = b[i]
    full_a = a.reshape(slots * k, *layer.base.weight.shape[1:])
    multiple = slots * k / layer.rank
    # PEFT's scaling is lora_alpha / R (or / sqrt(R)); ours alpha / r (or / sqrt(r)), with R = multiple * r.
    alpha = layer.alpha * (math.sqrt(multiple) if use_rslora else multiple)
    magnitude = None
    if "dora" in _variant_names(layer):
        rows = layer.base.weight.flatten(1).unflatten(0, (num_slots, -1)).norm(dim=-1)
        rows[list(used)] = layer.lora_magnitude.detach()
        magnitude = rows.flatten()
    if isinstance(layer, LoRAConv2d):
        full_b = full_b[..., None, None]
        magnitude = None if magnitude is None else magnitude[None, :, None, None]
    return PeftLayer(full_a.detach(), full_b.detach(), alpha, None if magnitude is None else magnitude.detach())


@torch.no_grad()
def from_peft_layer(name: str, layer: LoRALayer, peft: PeftLayer) -> None:
    """Set `layer`'s factors (and DoRA magnitude) from PEFT's; refuse what its slot structure cannot hold exactly."""
    b_full = peft.b.flatten(1)
    num_slots, used = _num_slots(layer)
    slot_b, slot_a = _blocks(layer)
    slots, k = slot_a.shape[0], slot_a.shape[1]
    if peft.a.shape[0] != slots * k or b_full.shape[1] != slots * k:
        raise AdapterMismatchError(
            f"{name}: PEFT rank {peft.a.shape[0]} does not match this adapter's {slots} slot(s) of rank {k}"
        )
    out_s = slot_b.shape[1]
    b = torch.stack([b_full[s * out_s : (s + 1) * out_s, i * k : (i + 1) * k] for i, s in enumerate(used)])
    expected = torch.zeros_like(b_full)
    for i, s in enumerate(used):
        expected[s * out_s : (s + 1) * out_s, i * k : (i + 1) * k] = b[i]
    if not torch.equal(expected, b_full):
        raise AdapterMismatchError(
            f"{name}: PEFT's B has non-zero entries outside the blocks of the {layer.parts} slot adapters (training "
            f"went on in PEFT); remove {SIDE_META} to load it as whole-layer adapters"
        )
    a = peft.a.reshape(slots, k, -1)
    if "pissa" in _variant_names(layer):
        r = layer.rank
        a, a0 = a[:, :r], a[:, r:]
        b, b0 = b[..., :r], -b[..., r:]
        a0_native, b0_native = layer._native_factors(b0, a0)
        layer.pissa_A0.copy_(a0_native)
        layer.pissa_B0.copy_(b0_native)
    a_native, b_native = layer._native_factors(b, a)
    layer.lora_A.copy_(a_native)
    layer.lora_B.copy_(b_native)
    if peft.magnitude is not None:
        rows = peft.magnitude.flatten().unflatten(0, (num_slots, -1))
        layer.lora_magnitude.copy_(rows[list(used)])


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def peft_adapter(model: nn.Module, all_batchnorm_stats: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT's `adapter_config.json` content and `adapter_model.safetensors` tensors for an adapted `model`."""
    layers = _lora_layers(model)
    if not layers:
        raise PeftFormatError("the model carries no LoRA adapters; PEFT's LoRA format holds only LoRA")
    use_rslora = {"rslora" in _variant_names(layer) for layer in layers.values()}
    use_dora = {"dora" in _variant_names(layer) for layer in layers.values()}
    dropouts = {getattr(layer.dropout, "p", 0.0) for layer in layers.values()}
    if len(use_rslora) > 1 or len(use_dora) > 1 or len(dropouts) > 1:
        raise PeftFormatError("PEFT's config has one rsLoRA, DoRA and dropout setting; these adapters mix them")
    rslora = use_rslora.pop()
    converted = {name: to_peft_layer(name, layer, rslora) for name, layer in layers.items()}
    head = classifier_name(model)
    tensors: dict[str, Tensor] = {}
    saved_modules = set()
    for key in adapter_keys(model, all_batchnorm_stats):
        owner = next((name for name in layers if key.startswith(name + ".")), None)
        if owner is not None:
            continue
        if head is None or not key.startswith(head + "."):
            raise PeftFormatError(
                f"the adapter also holds {key}, which PEFT's LoRA format cannot carry (only LoRA factors, DoRA "
                "magnitudes and the classifier head through modules_to_save)"
            )
        saved_modules.add(head)
        tensors[PREFIX + key] = model.state_dict()[key]
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
        "use_rslora": rslora,
        "use_dora": use_dora.pop(),
        "modules_to_save": sorted(saved_modules) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    contiguous = {
        key: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for key, t in tensors.items()
    }
    return config, contiguous


def save_peft_adapter(model: nn.Module, directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write `model`'s adapters as a PEFT adapter directory, with `meta` (its lora_vision record) beside them."""
    directory = Path(directory)
    config, tensors = peft_adapter(model, meta.get("all_batchnorm_stats", False))
    config["base_model_name_or_path"] = meta["model_name"]
    write_atomic(directory / PEFT_TENSORS, safetensors.torch.save(tensors))
    write_atomic(directory / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    # Only lora_vision's own record rebuilds the exact structure (an adapter that came from PEFT has none).
    if meta.get("format") == ADAPTER_FORMAT:
        write_atomic(directory / SIDE_META, json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return directory


def is_peft_adapter(path: str | Path) -> bool:
    return (_directory(path) / PEFT_CONFIG).is_file()


def peft_record(path: str | Path) -> dict[str, Any] | None:
    """The lora_vision record beside an exported PEFT adapter; None for an adapter made by PEFT."""
    file = _directory(path) / SIDE_META
    return json.loads(file.read_text()) if file.is_file() else None


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
    except json.JSONDecodeError as err:
        raise PeftFormatError(f"{directory / PEFT_CONFIG} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{directory / PEFT_CONFIG} holds {type(config).__name__}, not a PEFT config object")
    return config


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not (directory / PEFT_TENSORS).is_file():
        raise MissingInputError(f"{directory} has {PEFT_CONFIG} but no {PEFT_TENSORS}")
    return _read_config(directory), safetensors.torch.load_file(directory / PEFT_TENSORS)


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
    variants = {"rslora": bool(config.get("use_rslora")), "dora": bool(config.get("use_dora"))}
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


def _directory(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def load_peft_adapter(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Apply the PEFT adapter at `path` to the plain `base_model` in place, as lora_vision layers; return it in
    eval mode.

    With `lora_vision_adapter.json` (an adapter exported from here) the base is checked as `load_adapter` checks
    it and the recorded slot structure is rebuilt exactly; otherwise each PEFT LoRA becomes a whole-layer adapter.
    """
    directory = _directory(path)
    config, tensors = _read(directory)
    _check_config(config, directory)
    head = classifier_name(base_model)
    peft_layers = _peft_layers(config, tensors, head)
    meta = peft_record(directory)
    if meta is not None:
        _check_base(meta, base_model)
        instantiate(meta["method"], _convert_="all").apply(base_model)
        layers = _lora_layers(base_model)
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

    With `lora_vision_adapter.json` (an adapter exported from here) the recorded base is rebuilt, as
    `load_adapted_model` does. Otherwise the base is `timm.create_model(base_model_name_or_path or model_name,
    **model_kwargs)` with the saved head's class count, from pretrained weights or `checkpoint`.
    """
    if peft_record(path) is not None:
        return load_adapted_model(path, checkpoint=checkpoint, pretrained=pretrained)
    directory = _directory(path)
    # Building draws random numbers (the head, new factors before they are overwritten); the caller's stream stays.
    with torch.random.fork_rng(devices=[]):
        model, meta = _peft_base(directory, checkpoint, pretrained, model_name, model_kwargs)
        return load_peft_adapter(directory, model), meta
