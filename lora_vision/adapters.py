"""Adapter files: the few megabytes a fine-tuning run adds to a base model, and the checks that they fit one.

An adapter directory holds

- ``adapter.safetensors``: every trainable tensor (LoRA factors, a trained head, ...), every other tensor a LoRA
  layer owns (e.g. frozen initial factors) and the running statistics of BatchNorm layers that changed;
- ``adapter.json``: what base model it belongs to (timm name, create kwargs, class count, the fingerprint of its
  weights and where they came from), the method config that recreates the adapter structure, a per-layer summary,
  the tensor count and size, and the software versions.

The base weights are not stored: `load_adapter` refuses a base whose architecture, class count or weights differ
from the recorded ones, since an adapter applied to other weights silently computes something else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lora_vision.errors import MissingInputError, UserError
from lora_vision.lora import LoRALayer, classifier_name
from lora_vision.models import build_model
from lora_vision.module import frozen_batchnorms
from lora_vision.results import versions, write_atomic

ADAPTER_DIR = "adapter"
ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
FORMAT = "lora_vision.adapter"
FORMAT_VERSION = 1


class AdapterMismatchError(UserError, ValueError):
    """An adapter does not fit the base model it is loaded onto; the message says what differs."""


class AdapterFormatError(UserError, ValueError):
    """A file is not an adapter this version of lora_vision can read."""


class BaseWeightsMismatchError(AdapterMismatchError):
    """The base has the right architecture but other weights than the adapter was trained on."""


def _lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def _backbone_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The base model's tensors under their plain timm names: adapter tensors skipped, `.base` unwrapped.

    The classifier head is left out: fine-tuning replaces it, so it says nothing about which weights were adapted.
    """
    layers = _lora_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(
            f"cannot fingerprint a model with merged LoRA weights ({', '.join(merged[:3])}, ...): its base weights "
            "now include the updates; fingerprint the base before merging, or unmerge first"
        )
    head = classifier_name(model)
    for name, tensor in model.state_dict().items():
        plain = _unwrap(name, layers)
        if plain is not None and (head is None or not plain.startswith(f"{head}.")):
            yield plain, tensor


def _unwrap(name: str, layers: Mapping[str, LoRALayer]) -> str | None:
    """`name` as the plain model would call it, or None for a tensor a LoRA layer added."""
    for prefix in layers:
        if name.startswith(f"{prefix}."):
            inner = name[len(prefix) + 1 :]
            return f"{prefix}.{inner.removeprefix('base.')}" if inner.startswith("base.") else None
    return name


def _hash(tensors: Iterator[tuple[str, Tensor]], with_values: bool) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if with_values:
            # Viewed as raw bytes so every dtype (bfloat16 too) hashes without a numpy conversion of its values.
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of the backbone weights of a timm model, adapted or not (but not merged).

    Hashes every state-dict tensor except the classifier head: name, dtype, shape and bytes, in name order. LoRA
    layers count as the layer they wrap, so an adapted model has the fingerprint of its base. Raises ValueError
    for a model with merged adapters.
    """
    return _hash(_backbone_tensors(model), with_values=True)


def structure_fingerprint(model: nn.Module) -> str:
    """Like `weights_fingerprint`, but over names, dtypes and shapes only: equal for the same architecture."""
    return _hash(_backbone_tensors(model), with_values=False)


def _changed_batchnorm_buffers(model: nn.Module, all_batchnorm_stats: bool) -> set[str]:
    frozen = set() if all_batchnorm_stats else {id(m) for m in frozen_batchnorms(model)}
    return {
        f"{name}.{buffer}" if name else buffer
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and id(module) not in frozen
        for buffer, _ in module.named_buffers(recurse=False)
    }


def adapter_keys(model: nn.Module, all_batchnorm_stats: bool = False) -> list[str]:
    """State-dict keys an adapter file of `model` holds (see `adapter_state`), in state-dict order."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    layers = _lora_layers(model)
    batchnorm = _changed_batchnorm_buffers(model, all_batchnorm_stats)
    return [key for key in model.state_dict() if key in trainable or key in batchnorm or _unwrap(key, layers) is None]


def adapter_state(model: nn.Module, all_batchnorm_stats: bool = False) -> dict[str, Tensor]:
    """The tensors an adapter file holds, as contiguous CPU copies.

    Every trainable parameter, every tensor inside a LoRA layer but outside its `.base`, and the running statistics
    of BatchNorm layers with trainable parameters (those run in train mode, see `lora_vision.module.Classifier`).
    `all_batchnorm_stats` adds the statistics of frozen BatchNorm layers too: they change when training ran with
    `frozen_bn_eval=False`.
    """
    state = model.state_dict()
    return {
        key: state[key].detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for key in adapter_keys(model, all_batchnorm_stats)
    }


def _layer_summary(model: nn.Module) -> list[dict[str, Any]]:
    return [
        {"name": name, "rank": layer.rank, "alpha": layer.alpha, "parts": layer.parts}
        for name, layer in _lora_layers(model).items()
    ]


def head_classes(model: nn.Module) -> int:
    """Number of outputs of the classifier head (0 for a model without one)."""
    head = classifier_name(model)
    if head is None:
        return 0
    module = model.get_submodule(head)
    module = module.base if isinstance(module, LoRALayer) else module
    return int(getattr(module, "out_features", None) or getattr(module, "out_channels", None) or model.num_classes)


def architecture(model: nn.Module) -> str:
    """The timm architecture a model was created as (`vit_base_patch16_224`), or its class name."""
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    num_classes: int,
    method_config: Mapping[str, Any],
    base_fingerprint: str,
    base_source: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    all_batchnorm_stats: bool = False,
) -> Path:
    """Write `adapter.safetensors` and `adapter.json` into `directory` (each atomically); return the directory.

    Args:
        model: the adapted model (adapters not merged).
        model_name, model_kwargs, num_classes: how the base was created (`lora_vision.models.build_model`).
        method_config: `method.config()`; `hydra.utils.instantiate` of it recreates the method.
        base_fingerprint: `weights_fingerprint` of the base, taken before training.
        base_source: where the base weights came from: ``{"pretrained": bool, "checkpoint": path or None}``, plus
            ``"seed"`` for a randomly initialised base (its weights can be recreated only from that seed).
        data: the run's `data` config (plain values), so evaluation can default to the training data.
        extra: anything else worth keeping (experiment name, data option name, ...).
        all_batchnorm_stats: see `adapter_state`.
    """
    directory = Path(directory)
    tensors = adapter_state(model, all_batchnorm_stats)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "architecture": architecture(model),
        "model_kwargs": dict(model_kwargs),
        "num_classes": num_classes,
        "base_fingerprint": base_fingerprint,
        "base_structure": structure_fingerprint(model),
        "base_source": dict(base_source),
        "method": dict(method_config),
        "all_batchnorm_stats": all_batchnorm_stats,
        "layers": _layer_summary(model),
        "tensor_count": len(tensors),
        "tensor_params": sum(t.numel() for t in tensors.values()),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "versions": versions(),
        "data": None if data is None else dict(data),
        "extra": dict(extra or {}),
    }
    write_atomic(directory / ADAPTER_TENSORS, safetensors.torch.save(tensors))
    write_atomic(directory / ADAPTER_META, json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return directory


def adapter_directory(path: str | Path) -> Path:
    """The adapter directory of `path`: an adapter directory, one of its two files, or a run directory."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"adapter {path} does not exist")
    if path.is_file() and path.name in (ADAPTER_TENSORS, ADAPTER_META):
        path = path.parent
    for candidate in (path, path / ADAPTER_DIR):
        if (candidate / ADAPTER_META).is_file() and (candidate / ADAPTER_TENSORS).is_file():
            return candidate
    raise MissingInputError(
        f"{path} is not an adapter: expected a directory with {ADAPTER_TENSORS} and {ADAPTER_META} (or one of those "
        f"files), or a training run directory holding them in {ADAPTER_DIR}/"
    )


def read_meta(file: Path, kind: str, version: int) -> dict[str, Any]:
    """A JSON sidecar (`adapter.json`, `model.json`), refused unless it is the `kind` and version this code reads."""
    meta = json.loads(file.read_text())
    if not isinstance(meta, dict) or meta.get("format") != kind or meta.get("format_version") != version:
        found = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else (None, None)
        raise AdapterFormatError(
            f"{file}: unsupported format {found[0]!r} version {found[1]!r}; this lora_vision reads {kind!r} "
            f"version {version}"
        )
    return meta


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """The `adapter.json` of an adapter directory or file."""
    return read_meta(adapter_directory(path) / ADAPTER_META, FORMAT, FORMAT_VERSION)


def _check_base(meta: Mapping[str, Any], base: nn.Module) -> None:
    """Refuse a base the adapter was not trained on, before the base is modified."""
    if _lora_layers(base):
        raise AdapterMismatchError("the base model already carries LoRA layers; load an adapter onto a plain model")
    trained_on = f"{meta['architecture']} with {meta['num_classes']} classes"
    if architecture(base) != meta["architecture"]:
        raise AdapterMismatchError(
            f"adapter was trained on {trained_on}, this base is {architecture(base)} with {head_classes(base)} classes"
        )
    if head_classes(base) != meta["num_classes"]:
        raise AdapterMismatchError(f"adapter was trained on {trained_on}, this base has {head_classes(base)} classes")
    if structure_fingerprint(base) != meta["base_structure"]:
        raise AdapterMismatchError(
            f"base tensors (names, shapes or dtypes) differ from those of the {meta['model_name']} the adapter was "
            f"trained on; create the base with the recorded kwargs {meta['model_kwargs']} and in float32"
        )
    fingerprint = weights_fingerprint(base)
    if fingerprint != meta["base_fingerprint"]:
        raise BaseWeightsMismatchError(
            f"base weights differ from the ones the adapter was trained on (fingerprint {fingerprint[:12]}… vs "
            f"{meta['base_fingerprint'][:12]}…); pass the same pretrained weights/checkpoint "
            f"(recorded source: {_describe_source(meta['base_source'])})"
        )


def _describe_source(source: Mapping[str, Any]) -> str:
    if source.get("checkpoint"):
        return f"checkpoint {source['checkpoint']}"
    if source.get("pretrained"):
        return "timm pretrained weights"
    return f"random init with seed {source.get('seed')}"


def _check_tensors(expected: Mapping[str, Tensor], provided: Mapping[str, Tensor], path: Path) -> None:
    missing = [k for k in expected if k not in provided]
    unused = [k for k in provided if k not in expected]
    if missing or unused:
        raise AdapterMismatchError(
            f"{path} does not match the adapter structure its method config builds: "
            f"missing {missing[:5] or 'none'}, unused {unused[:5] or 'none'}"
        )
    wrong = [
        f"{k} {tuple(provided[k].shape)} vs {tuple(t.shape)}"
        for k, t in expected.items()
        if t.shape != provided[k].shape
    ]
    if wrong:
        raise AdapterMismatchError(f"{path}: tensor shapes differ from the built adapter: {', '.join(wrong[:5])}")


def load_adapter(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Apply the adapter at `path` (directory or one of its files) to `base_model` in place; return it in eval mode.

    A PEFT adapter directory (`adapter_config.json`) is applied through `lora_vision.peft_format`.

    The base is checked first (architecture, class count, tensor structure, weight fingerprint) and refused with
    `AdapterMismatchError` naming the difference. Then the recorded method is applied and the saved tensors are
    loaded strictly: every saved tensor is used and every adapter tensor is provided.
    """
    # Imported here: lora_vision.peft_format builds on this module.
    from lora_vision.peft_format import is_peft_adapter, load_peft_adapter

    if is_peft_adapter(path):
        return load_peft_adapter(path, base_model)
    directory = adapter_directory(path)
    meta = read_adapter_meta(directory)
    _check_base(meta, base_model)
    method = instantiate(meta["method"], _convert_="all")
    method.apply(base_model)
    tensors = safetensors.torch.load_file(directory / ADAPTER_TENSORS)
    state = base_model.state_dict()
    expected = {k: state[k] for k in adapter_keys(base_model, meta["all_batchnorm_stats"])}
    _check_tensors(expected, tensors, directory / ADAPTER_TENSORS)
    base_model.load_state_dict(tensors, strict=False)
    return base_model.eval()


def check_base_source(meta: Mapping[str, Any], checkpoint: str | Path | None) -> None:
    """Refuse, with the fix, a given or recorded base checkpoint that is not here."""
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise MissingInputError(f"base checkpoint {checkpoint} does not exist or is not a file")
    recorded = meta["base_source"].get("checkpoint")
    if checkpoint is None and recorded is not None and not Path(recorded).is_file():
        raise MissingInputError(
            f"the adapter's base weights were loaded from {recorded}, which does not exist here; pass the same "
            "weights file as the base checkpoint (--checkpoint PATH, or checkpoint=PATH in Python)"
        )


def build_recorded_base(
    meta: Mapping[str, Any], checkpoint: str | Path | None = None, pretrained: bool | None = None
) -> nn.Module:
    """The base model an adapter's meta records, from its recorded source unless `checkpoint` or `pretrained` say
    otherwise. A randomly initialised base is drawn from the recorded seed: call inside `torch.random.fork_rng`."""
    check_base_source(meta, checkpoint)
    source = meta["base_source"]
    if _seeded_base(meta, checkpoint, pretrained) and source.get("seed") is not None:
        torch.manual_seed(source["seed"])
    pretrained = source["pretrained"] if pretrained is None else pretrained
    checkpoint = checkpoint or source.get("checkpoint")
    return build_model(
        meta["model_name"],
        num_classes=meta["num_classes"],
        pretrained=pretrained,
        checkpoint=checkpoint,
        kwargs=meta["model_kwargs"],
        zero_init_head=False,
    )


def _seeded_base(meta: Mapping[str, Any], checkpoint: str | Path | None, pretrained: bool | None) -> bool:
    """Whether `build_recorded_base` draws the base from the recorded seed (no pretrained weights, no checkpoint)."""
    source = meta["base_source"]
    pretrained = source["pretrained"] if pretrained is None else pretrained
    return not pretrained and (checkpoint or source.get("checkpoint")) is None


def _seed_hint(err: BaseWeightsMismatchError) -> BaseWeightsMismatchError:
    return BaseWeightsMismatchError(
        f"{err}. The base was randomly initialised (model.pretrained=false) and could not be recreated from its seed; "
        "give the weights it started from with a checkpoint (--checkpoint / checkpoint=PATH), or train from "
        "pretrained weights or a model.checkpoint so the base can be rebuilt"
    )


def load_adapted_model(
    path: str | Path, checkpoint: str | Path | None = None, pretrained: bool | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the recorded base model and load the adapter at `path` onto it; return (model, adapter meta).

    The base comes from the recorded source unless overridden: `checkpoint` (a local weights file) or `pretrained`.
    A randomly initialised base is recreated from the recorded seed, which gives the same weights only if nothing
    drew random numbers before the model was built; the fingerprint check tells. A PEFT adapter directory
    (`adapter_config.json`) is read through `lora_vision.peft_format`.
    """
    # Imported here: lora_vision.peft_format builds on this module.
    from lora_vision.peft_format import is_peft_adapter, load_peft_adapted_model, peft_record

    if is_peft_adapter(path):
        meta = peft_record(path)
        if meta is None:  # made by PEFT: the base is what its config names
            return load_peft_adapted_model(path, checkpoint=checkpoint, pretrained=pretrained)
    else:
        meta = read_adapter_meta(path)
    # Rebuilding draws random numbers (a random-init base, new adapter factors before they are overwritten); the
    # caller's random stream stays as it was.
    with torch.random.fork_rng(devices=[]):
        base = build_recorded_base(meta, checkpoint, pretrained)
        try:
            return load_adapter(path, base), meta
        except BaseWeightsMismatchError as err:
            if not _seeded_base(meta, checkpoint, pretrained):
                raise
            raise _seed_hint(err) from None
