"""lora_vision's adapter format: the few megabytes a fine-tuning run adds to a base model.

An adapter directory holds

- ``adapter.safetensors``: every trainable tensor (LoRA factors, a trained head, ...), every other tensor a LoRA
  layer owns (e.g. frozen initial factors) and the running statistics of BatchNorm layers that changed;
- ``adapter.json``: what base model it belongs to (timm name, create kwargs, class count, the fingerprint of its
  weights and where they came from), the method that recreates the adapter structure (its name and settings, as
  data), a per-layer summary, the tensor count and size, and the software versions.

The base weights are not stored: loading refuses a base whose architecture, class count or weights differ from the
recorded ones (`lora_vision.adapters.fingerprint`), since an adapter applied to other weights silently computes
something else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from lora_vision.adapters.errors import AdapterFormatError, AdapterMismatchError, BaseWeightsMismatchError
from lora_vision.adapters.fingerprint import architecture, check_base, structure_fingerprint
from lora_vision.adapters.record import check_value_types, method_record, read_meta
from lora_vision.adapters.tensors import adapter_keys, adapter_state
from lora_vision.errors import MissingInputError, one_line
from lora_vision.lora import ParameterSummary, named_lora_layers
from lora_vision.methods import method_from_config
from lora_vision.models import build_model, model_label
from lora_vision.results import versions, write_atomic

ADAPTER_DIR = "adapter"
ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
FORMAT = "lora_vision.adapter"
# 2: the method is recorded as {"name", "settings"}; 1 recorded a Hydra `_target_` (read by lookup, see record.py).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# What loading reads from adapter.json.
REQUIRED_KEYS = (
    "model_name",
    "architecture",
    "model_kwargs",
    "num_classes",
    "base_fingerprint",
    "base_structure",
    "base_source",
    "method",
    "all_batchnorm_stats",
)
# The JSON types of what loading reads from adapter.json, beyond the method record (checked by rebuilding the method).
RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "model_name": (str,),
    "architecture": (str,),
    "model_kwargs": (dict,),
    "num_classes": (int,),
    "base_fingerprint": (str,),
    "base_structure": (str,),
    "base_source": (dict,),
    "all_batchnorm_stats": (bool,),
    "data": (dict, type(None)),
}
BASE_SOURCE_TYPES: dict[str, tuple[type, ...]] = {
    "pretrained": (bool,),
    "checkpoint": (str, type(None)),
    "seed": (int, type(None)),
}


def _layer_summary(model: nn.Module) -> list[dict[str, Any]]:
    return [
        {"name": name, "rank": layer.rank, "alpha": layer.alpha, "parts": layer.parts}
        for name, layer in named_lora_layers(model).items()
    ]


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
        method_config: `method.config()`, from which `lora_vision.methods.method_from_config` rebuilds the method.
        base_fingerprint: `weights_fingerprint` of the base, taken before training.
        base_source: where the base weights came from: ``{"pretrained": bool, "checkpoint": path or None}``, plus
            ``"seed"`` for a randomly initialised base (its weights can be recreated only from that seed).
        data: the run's `data` config (plain values), so evaluation can default to the training data.
        extra: anything else worth keeping (experiment name, data option name, ...).
        all_batchnorm_stats: see `adapter_state`.
    """
    method_from_config(method_config)  # a record that could not be read back is refused before anything is written
    directory = Path(directory)
    tensors = adapter_state(model, all_batchnorm_stats)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        # The base as built (kwargs, random or pretrained weights), for people: the timm name alone may name
        # pretrained weights a random-init base never had.
        "model_label": model_label(
            model_name, model_kwargs, base_source.get("pretrained", True), base_source.get("checkpoint")
        ),
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


def read_adapter_record(file: Path) -> dict[str, Any]:
    """An adapter record (`adapter.json`, or its copy beside a PEFT export), checked and in the current format.

    An `AdapterFormatError` naming `file` for another format or version, a missing key, a value of another type or a
    method record that does not name a known method with valid settings. A version-1 record comes back converted to
    the current version.
    """
    meta = read_meta(file, FORMAT, READABLE_VERSIONS)
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise AdapterFormatError(f"{file}: the adapter record lacks {', '.join(missing)}")
    check_value_types(meta, RECORD_TYPES, file)
    check_value_types(meta["base_source"], BASE_SOURCE_TYPES, file, "base_source.")
    return {
        **meta,
        "format_version": FORMAT_VERSION,
        "method": method_record(meta["method"], file, meta["format_version"]),
    }


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """The `adapter.json` of an adapter directory or file (see `read_adapter_record`)."""
    return read_adapter_record(adapter_directory(path) / ADAPTER_META)


def apply_recorded_method(meta: Mapping[str, Any], base: nn.Module) -> ParameterSummary:
    """Check `base` against the adapter record `meta`, then apply the recorded method to it."""
    check_base(meta, base)
    return method_from_config(meta["method"]).apply(base)


@contextmanager
def damaged_tensors_refused(file: Path) -> Iterator[None]:
    """Turn safetensors' error on reading `file` inside the block into an `AdapterFormatError` naming the file.

    safetensors checks the header, which lists every tensor's byte range, against the file's size: a copy or
    download that stopped early, or a file overwritten with something else, fails there.
    """
    try:
        yield
    except safetensors.SafetensorError as err:
        raise AdapterFormatError(
            f"{file} is truncated or damaged ({one_line(err)}); copy it again from where it was made"
        ) from None


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


def load_native_adapter(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Apply the adapter at `path` (directory or one of its files) to `base_model` in place; return it in eval mode.

    The base is checked first (architecture, class count, tensor structure, weight fingerprint) and refused with
    `AdapterMismatchError` naming the difference. Then the recorded method is applied and the saved tensors are
    loaded strictly: every saved tensor is used and every adapter tensor is provided.
    """
    directory = adapter_directory(path)
    meta = read_adapter_meta(directory)
    apply_recorded_method(meta, base_model)
    with damaged_tensors_refused(directory / ADAPTER_TENSORS):
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


def load_onto_recorded_base(
    meta: Mapping[str, Any],
    load: Callable[[nn.Module], nn.Module],
    checkpoint: str | Path | None = None,
    pretrained: bool | None = None,
) -> nn.Module:
    """`load(base)` on the base that the adapter record `meta` names (see `build_recorded_base`).

    A randomly initialised base is recreated from the recorded seed, which gives the same weights only if nothing
    drew random numbers before the model was built; the fingerprint check tells, and its error then says so.
    """
    # Rebuilding draws random numbers (a random-init base, new adapter factors before they are overwritten); the
    # caller's random stream stays as it was.
    with torch.random.fork_rng(devices=[]):
        base = build_recorded_base(meta, checkpoint, pretrained)
        try:
            return load(base)
        except BaseWeightsMismatchError as err:
            if not _seeded_base(meta, checkpoint, pretrained):
                raise
            raise _seed_hint(err) from None


def load_native_adapted_model(
    path: str | Path, checkpoint: str | Path | None = None, pretrained: bool | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The recorded base model of the adapter at `path` with the adapter loaded, and the adapter's record."""
    meta = read_adapter_meta(path)
    return load_onto_recorded_base(meta, partial(load_native_adapter, path), checkpoint, pretrained), meta
