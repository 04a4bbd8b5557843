"""Export: an adapted model as plain timm weights loadable without lora_vision, or as a PEFT adapter.

`python -m lora_vision.export SOURCE --out DIR [--format merged|peft] [--checkpoint BASE_WEIGHTS]` rebuilds the
adapted model of a run directory or adapter (ours or PEFT's, see `lora_vision.adapters`). `--format peft` writes
PEFT's `adapter_config.json` and `adapter_model.safetensors` (see `lora_vision.adapters.peft` for what maps to
what). The default, merged, folds the adapters into the base weights and writes

- ``model.safetensors``: the state dict of the plain timm architecture;
- ``model.json``: model name, create kwargs, class count, timm data config and the exact load call.

The load call names the class count twice on purpose: timm drops the classifier weights of a pretrained file (and
loads the rest non-strictly) whenever the model's `num_classes` differs from the pretrained config's, so the
overlay must carry the new class count too.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
from torch import nn

from lora_vision.adapters import load_adapted_model, read_meta, save_peft_adapter
from lora_vision.adapters.native import damaged_tensors_refused
from lora_vision.adapters.tensors import contiguous_cpu
from lora_vision.errors import MissingInputError, user_errors_as_messages
from lora_vision.lora import merge_and_unload
from lora_vision.models import model_data_config
from lora_vision.results import versions, write_atomic

MODEL_TENSORS = "model.safetensors"
MODEL_META = "model.json"
FORMAT = "lora_vision.merged"
FORMAT_VERSION = 1


def create_kwargs(
    model_name: str, num_classes: int, model_kwargs: Mapping[str, Any], file: str | Path, label_offset: bool = False
) -> dict[str, Any]:
    """Keyword arguments of `timm.create_model` that load an exported weights `file` exactly.

    `label_offset`: the pretrained config of `model_name` shifts labels (a background class); the overlay resets
    it, since the exported head already has the final classes.
    """
    overlay: dict[str, Any] = {"file": str(file), "num_classes": num_classes}
    if label_offset:
        overlay["label_offset"] = 0
    return {
        "model_name": model_name,
        "pretrained": True,
        "pretrained_cfg_overlay": overlay,
        "num_classes": num_classes,
        **model_kwargs,
    }


def load_call(kwargs: Mapping[str, Any]) -> str:
    """`create_kwargs` as the Python expression a user pastes: ``timm.create_model('name', ...)``."""
    options = dict(kwargs)
    name = options.pop("model_name")
    overlay = ", ".join(f"{key}={value!r}" for key, value in options.pop("pretrained_cfg_overlay").items())
    rest = "".join(f", {key}={value!r}" for key, value in options.items() if key != "pretrained")
    return f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict({overlay}){rest})"


def _json_ready(data_config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in data_config.items()}


def export_merged(
    model: nn.Module,
    directory: str | Path,
    *,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    num_classes: int,
    data_config: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write the merged plain-timm weights of `model` and their `model.json` into `directory`; return it.

    Args:
        model: an adapted (not merged) or plain model; it is left untouched.
        model_name, model_kwargs, num_classes: how the base was created.
        data_config: the timm data config the model expects (default: timm's, from the model).
        data: the training run's `data` config, kept so evaluation can default to the training data.
        source: provenance to record (the adapter's fingerprint, method, ...).
    """
    directory = Path(directory)
    plain = merge_and_unload(model)
    tensors = contiguous_cpu(plain.state_dict())
    file = directory.resolve() / MODEL_TENSORS
    label_offset = bool(getattr(plain, "pretrained_cfg", {}).get("label_offset"))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "num_classes": num_classes,
        "label_offset": label_offset,
        "data_config": _json_ready(data_config or timm.data.resolve_model_data_config(plain)),
        "load": load_call(create_kwargs(model_name, num_classes, model_kwargs, file, label_offset)),
        "data": None if data is None else dict(data),
        "source": dict(source or {}),
        "versions": versions(),
    }
    write_atomic(file, safetensors.torch.save(tensors))
    write_atomic(directory / MODEL_META, json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return directory


def merged_directory(path: str | Path) -> Path:
    """The export directory of `path`: the directory itself or the one holding `model.safetensors`/`model.json`."""
    path = Path(path)
    directory = path.parent if path.is_file() and path.name in (MODEL_TENSORS, MODEL_META) else path
    if (directory / MODEL_META).is_file() and (directory / MODEL_TENSORS).is_file():
        return directory
    raise MissingInputError(
        f"{path} is not a merged export: expected a directory with {MODEL_TENSORS} and {MODEL_META}"
    )


def read_merged_meta(path: str | Path) -> dict[str, Any]:
    """The `model.json` of a merged export directory or file."""
    return read_meta(merged_directory(path) / MODEL_META, FORMAT, (FORMAT_VERSION,))


def load_merged(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported model at `path` (directory or one of its files) in eval mode, and its `model.json`.

    Loads with the same call `model.json` documents, with the weights file found next to `model.json`, so an
    export can be moved.
    """
    directory = merged_directory(path)
    meta = read_merged_meta(directory)
    file = directory / MODEL_TENSORS
    kwargs = create_kwargs(meta["model_name"], meta["num_classes"], meta["model_kwargs"], file, meta["label_offset"])
    with damaged_tensors_refused(file):
        return timm.create_model(**kwargs).eval(), meta


def export_adapter(source: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Rebuild the adapted model of a run directory or adapter and export it merged into `out`."""
    model, meta = load_adapted_model(source, checkpoint=checkpoint)
    data = meta.get("data")
    data_config = model_data_config(model, data["image_size"], data.get("crop_pct")) if data else None
    provenance = {key: meta.get(key) for key in ("model_label", "base_fingerprint", "base_source", "method")}
    return export_merged(
        model,
        out,
        model_name=meta["model_name"],
        model_kwargs=meta["model_kwargs"],
        num_classes=meta["num_classes"],
        data_config=data_config,
        data=data,
        source={"adapter": str(Path(source).resolve()), **provenance},
    )


def export_peft(
    source: str | Path, out: str | Path, checkpoint: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Rebuild the adapted model of a run directory or adapter, write it as a PEFT adapter into `out`; return the
    directory and the adapter's record."""
    model, meta = load_adapted_model(source, checkpoint=checkpoint)
    return save_peft_adapter(model, out, meta), meta


def peft_load_code(meta: Mapping[str, Any], directory: str | Path) -> str:
    """The Python lines that load the PEFT export in `directory` with timm and PEFT alone, onto the base the adapter
    record `meta` names: timm name, class count, create kwargs and the weights (pretrained, a checkpoint file, or
    the seed of a random init)."""
    source = meta["base_source"]
    checkpoint = source.get("checkpoint")
    pretrained = bool(checkpoint or source["pretrained"])
    overlay = f", pretrained_cfg_overlay=dict(file={checkpoint!r})" if checkpoint else ""
    options = "".join(
        f", {key}={value!r}" for key, value in {"num_classes": meta["num_classes"], **meta["model_kwargs"]}.items()
    )
    base = f"timm.create_model({meta['model_name']!r}, pretrained={pretrained}{overlay}{options})"
    # A random base is what timm draws right after seeding, as the adapter's base was.
    seeded = not pretrained and source.get("seed") is not None
    seeding = ["import torch", f"torch.manual_seed({source['seed']})"] if seeded else []
    lines = ["import timm", "from peft import PeftModel", *seeding]
    return "\n".join([*lines, f"model = PeftModel.from_pretrained({base}, {str(Path(directory).resolve())!r})"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lora_vision.export", description="Merge an adapter into its base and export plain timm weights."
    )
    parser.add_argument("source", help="a training run directory, or an adapter directory or file")
    parser.add_argument("--out", required=True, help="directory to write the export into")
    parser.add_argument(
        "--format",
        choices=("merged", "peft"),
        default="merged",
        help="merged: plain timm weights (model.safetensors, model.json); peft: a PEFT LoRA adapter directory",
    )
    parser.add_argument("--checkpoint", help="base weights file, when the recorded one is not available here")
    args = parser.parse_args(argv)
    with user_errors_as_messages(parser.prog):
        if args.format == "peft":
            directory, meta = export_peft(args.source, args.out, args.checkpoint)
            print(f"exported to {directory}\nload with:\n{textwrap.indent(peft_load_code(meta, directory), '  ')}")
            return
        directory = export_adapter(args.source, args.out, args.checkpoint)
    meta = json.loads((directory / MODEL_META).read_text())
    built = meta["source"].get("model_label") or meta["model_name"]
    print(f"exported {built} to {directory}\nload with:\n  import timm\n  model = {meta['load']}")


if __name__ == "__main__":
    main()
