"""Evaluation of a trained model: a run directory, an adapter or a merged export, on any configured dataset; or
several adapters of one base model, each on its own data, with one backbone in memory.

    python -m lora_vision.evaluate SOURCE [--split test|val] [--checkpoint BASE_WEIGHTS] [--batch-size N]
        [--num-workers N] [--device auto|cpu|cuda] [--limit-batches N] [--out FILE.json] [data=NAME] [data.KEY=VALUE]
    python -m lora_vision.evaluate NAME=SOURCE NAME=SOURCE ... [--data NAME:data=NAME] [--data NAME:data.KEY=VALUE]
        [data=NAME] [data.KEY=VALUE] [the options above but --out]

Without ``data=NAME`` the data the source was trained on is used (as recorded in its adapter or export);
``data=NAME`` picks an option of the project's ``conf/data/`` group instead, and ``data.KEY=VALUE`` overrides apply
on top of either. The result (top-1, top-5, loss, image count) is printed and written as JSON to
``<source dir>/eval/<data name>_<split>.json`` (or ``--out``); a VTAB-1k task adds its name (``vtab1k-dtd_test.json``).

Named sources (``woof=runs/woof cifar=peft_cifar/``: run directories, adapters or PEFT adapters) are loaded onto one
base model (`lora_vision.adapters.load_adapters`, on the base the first one records) and each is scored with its
adapter active, on its own data: the recorded one unless ``--data NAME:data=OPTION`` picks another, with the
``data=...`` arguments given without a name applying to every adapter and ``--data NAME:...`` after them. Each
result goes where evaluating that source alone would write it, and a summary line per adapter is printed.

Other CLIs reuse the pieces: `add_eval_arguments` (the shared options), `load_source` (the model),
`build_eval_datamodule` (the data, ready for the model) and `evaluate_model` (the metrics).
"""

from __future__ import annotations

import argparse
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

import lora_vision.data
from lora_vision.adapters import (
    ADAPTER_DIR,
    adapter_directory,
    architecture,
    head_classes,
    is_peft_adapter,
    load_adapted_model,
    load_adapters_onto_recorded_base,
    peft_meta,
    read_adapter_meta,
)
from lora_vision.builders import build_datamodule
from lora_vision.data import ImageDataModule
from lora_vision.data.errors import DataOptionError
from lora_vision.errors import UserError, user_errors_as_messages
from lora_vision.export import load_merged, merged_directory, read_merged_meta
from lora_vision.lora import set_active_adapters
from lora_vision.models import model_data_config
from lora_vision.module import accuracy_metrics
from lora_vision.results import PROJECT_ROOT, versions, write_json_atomic

CONF_DIR = PROJECT_ROOT / "conf"
SPLITS = ("test", "val")
_SPLIT_STAGES = {"test": "test", "val": "validate"}
EXPECTED_SOURCES = (
    "a training run directory (with .hydra/ and adapter/), an adapter directory or its adapter.safetensors / "
    "adapter.json, a merged export directory or its model.safetensors / model.json, or a PEFT adapter directory "
    "(adapter_config.json, adapter_model.safetensors)"
)


# The datamodules a recorded data config may name: its `_target_` is looked up here before Hydra builds it, so an
# adapter or export from anyone cannot make evaluation call anything else.
DATAMODULES = tuple(
    f"lora_vision.data.{name}"
    for name in lora_vision.data.__all__
    if isinstance(getattr(lora_vision.data, name), type)
    and issubclass(getattr(lora_vision.data, name), L.LightningDataModule)
)
# Hydra's instantiation keys: only the top-level `_target_` of a recorded data config may use one.
HYDRA_KEY = re.compile(r"^_.+_$")
# A named source, NAME=SOURCE: NAME is an adapter name (letters, digits, _ and -), never `data`.
NAMED_SOURCE = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_-]*)=(?P<path>.+)$")
ADAPTER_SOURCES = "run directories, adapter directories or files, or PEFT adapter directories"


class EvaluationError(UserError, ValueError):
    """Bad evaluation input (source, split, data option or key, device); the message says what is valid."""


def _hydra_keys(value: Any, prefix: str = "") -> Iterator[str]:
    """The dotted paths of Hydra's instantiation keys (`_target_`, `_args_`, ...) in a config of plain values."""
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and HYDRA_KEY.match(key):
            yield f"{prefix}{key}"
        yield from _hydra_keys(item, f"{prefix}{key}.")


def check_recorded_data(data: Any, directory: Path) -> None:
    """Refuse the data config recorded in `directory` unless Hydra would build a lora_vision datamodule from it and
    nothing else."""
    if data is None:
        return
    target = data.get("_target_") if isinstance(data, Mapping) else data
    if target not in DATAMODULES:
        raise EvaluationError(
            f"the data config recorded in {directory} names {target!r}, which is not a lora_vision datamodule; "
            f"a recorded config names one of {', '.join(DATAMODULES)}"
        )
    nested = [key for key in _hydra_keys(data) if key != "_target_"]
    if nested:
        raise EvaluationError(
            f"the data config recorded in {directory} holds Hydra instantiation keys ({', '.join(nested)}); a "
            "recorded config holds the datamodule's options only"
        )


@dataclass(frozen=True)
class Source:
    """What a source path holds, read from its metadata only (no weights loaded).

    `kind` is "run", "adapter", "merged" or "peft"; `directory` holds the adapter or export files; `home` is where
    evaluation results go by default; `meta` is the `adapter.json` or `model.json`, whose recorded data config is
    checked on construction (`check_recorded_data`).
    """

    path: Path
    kind: str
    directory: Path
    home: Path
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        check_recorded_data(self.meta.get("data"), self.directory)

    @property
    def data_cfg(self) -> DictConfig | None:
        """The training run's `data` config, when the source recorded one."""
        data = self.meta.get("data")
        return None if data is None else OmegaConf.create(data)

    @property
    def image_size(self) -> int | None:
        """The input side length the model was trained at, when known."""
        if self.meta.get("data"):
            return self.meta["data"]["image_size"]
        if self.kind == "merged":
            return self.meta["data_config"]["input_size"][-1]
        return self.meta["model_kwargs"].get("img_size")


@dataclass
class Loaded:
    """A model ready for evaluation (eval mode) and what is known about how it was trained.

    `kind`: "run", "adapter", "merged" or "peft"; `data_cfg`: the recorded `data` config (None if not recorded);
    `image_size`: the input side length the model expects (None if unknown); `meta`: its adapter.json/model.json.
    """

    model: nn.Module
    kind: str
    model_name: str
    num_classes: int
    data_cfg: DictConfig | None
    image_size: int | None
    meta: dict[str, Any]
    source: Source


@dataclass
class EvalData:
    """A datamodule set up for one split of a model, with the name and config of its data."""

    datamodule: ImageDataModule
    name: str
    split: str
    cfg: DictConfig

    def dataloader(self) -> DataLoader:
        if self.split == "val":
            return self.datamodule.val_dataloader()
        return self.datamodule.test_dataloader()


def locate_source(source: str | Path) -> Source:
    """Identify `source` (a run directory, adapter or merged export) from its files; raise EvaluationError if none."""
    path = Path(source).expanduser()
    if not path.exists():
        raise EvaluationError(f"source {path} does not exist; expected {EXPECTED_SOURCES}")
    if path.is_dir() and (path / ".hydra" / "config.yaml").is_file():
        if not (path / ADAPTER_DIR).is_dir():
            raise EvaluationError(
                f"run directory {path} has no {ADAPTER_DIR}/ (runs that failed or predate adapter saving have none); "
                f"expected {EXPECTED_SOURCES}"
            )
        directory = adapter_directory(path / ADAPTER_DIR)
        return Source(path, "run", directory, path, read_adapter_meta(directory))
    if is_peft_adapter(path):
        directory = path.parent if path.is_file() else path
        return Source(path, "peft", directory, directory, peft_meta(directory))
    for kind, find in (("adapter", adapter_directory), ("merged", merged_directory)):
        try:
            directory = find(path)
        except FileNotFoundError:
            continue
        meta = read_adapter_meta(directory) if kind == "adapter" else read_merged_meta(directory)
        return Source(path, kind, directory, directory, meta)
    raise EvaluationError(f"{path} is not an evaluation source; expected {EXPECTED_SOURCES}")


def load_source(source: str | Path | Source, checkpoint: str | Path | None = None) -> Loaded:
    """The model of `source` (run directory, adapter dir/file, merged export dir/file), in eval mode.

    `checkpoint` replaces the recorded base weights of an adapter (a merged export holds all its weights).
    Raises EvaluationError for an unknown source, and the adapter errors of `lora_vision.adapters` when the base
    cannot be rebuilt.
    """
    found = source if isinstance(source, Source) else locate_source(source)
    if found.kind == "merged":
        if checkpoint is not None:
            raise EvaluationError(f"{found.path} is a merged export, which holds all its weights; drop --checkpoint")
        model, meta = load_merged(found.directory)
    else:
        model, meta = load_adapted_model(found.directory, checkpoint=checkpoint)
    return Loaded(
        model=model,
        kind=found.kind,
        model_name=meta["model_name"],
        num_classes=meta["num_classes"],
        data_cfg=found.data_cfg,
        image_size=found.image_size,
        meta=meta,
        source=found,
    )


def evaluate_model(
    model: nn.Module,
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    device: str | torch.device = "cpu",
    limit_batches: int | None = None,
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float | int]:
    """Top-1/top-5 accuracy, mean cross-entropy and image count of `model` over `dataloader`.

    Runs in eval mode under `torch.inference_mode()` on `device` (the model is moved there), over at most
    `limit_batches` batches; the model's train/eval mode is restored afterwards. `batch_transform` is applied
    to each batch of images once it is on `device`: pass the datamodule's `batch_transform`, which a
    `resize_on_device` datamodule needs (Lightning calls it itself). Returns ``{"acc1", "acc5", "loss", "images"}``.
    """
    metrics = accuracy_metrics(num_classes).to(device)
    was_training = model.training
    model.eval().to(device)
    loss_sum, images = 0.0, 0
    try:
        with torch.inference_mode():
            for inputs, labels in itertools.islice(dataloader, limit_batches):
                inputs, labels = inputs.to(device), labels.to(device)
                if batch_transform is not None:
                    inputs = batch_transform(inputs)
                logits = model(inputs)
                loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
                metrics.update(logits, labels)
                images += len(labels)
    finally:
        model.train(was_training)
    if images == 0:
        raise EvaluationError("the dataloader yielded no images")
    scores = metrics.compute()
    return {"acc1": float(scores["acc1"]), "acc5": float(scores["acc5"]), "loss": loss_sum / images, "images": images}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every evaluating CLI shares to `parser`.

    Positional: ``source`` (run dir, adapter or merged export) and ``overrides`` (``data=NAME``,
    ``data.KEY=VALUE``). Options: ``--split`` (test|val), ``--checkpoint`` (base weights file), ``--batch-size``,
    ``--num-workers``, ``--device`` (auto|cpu|cuda), ``--limit-batches``. Parse with
    ``parser.parse_intermixed_args()`` so overrides may come before or after options; then `load_source`,
    `build_eval_datamodule` and `resolve_device`.
    """
    parser.add_argument("source", help=f"what to evaluate: {EXPECTED_SOURCES}")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="data=NAME | data.KEY=VALUE",
        help="dataset: an option of conf/data (default: the data the source was trained on), and keys to override",
    )
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate (default: test)")
    parser.add_argument("--checkpoint", help="base weights file of an adapter, when the recorded one is not here")
    parser.add_argument("--batch-size", type=_positive_int, help="images per batch (default: the data config's)")
    parser.add_argument("--num-workers", type=int, help="DataLoader worker processes (default: the data config's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    parser.add_argument("--limit-batches", type=_positive_int, help="evaluate at most this many batches")


def resolve_device(name: str) -> torch.device:
    """`--device`: "auto" is CUDA when available, else the CPU; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda, but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def data_options() -> list[str]:
    """The options of the project's `conf/data/` group."""
    return sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


def parse_overrides(overrides: Sequence[str]) -> tuple[str | None, dict[str, Override]]:
    """Split ``data=NAME`` / ``data.KEY=VALUE`` arguments into (option or None, {key: override}); check the option.

    Parsed by Hydra's own override parser, so values are typed, quoted and listed exactly as on the training
    command line.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise EvaluationError(f"{err}; expected data=NAME or data.KEY=VALUE") from None
    option: str | None = None
    keys: dict[str, Override] = {}
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override() or override.is_delete() or not (key == "data" or key.startswith("data.")):
            raise EvaluationError(f"argument {override.input_line!r} is not data=NAME or data.KEY=VALUE")
        if key == "data":
            option = str(override.value())
        else:
            keys[key.removeprefix("data.")] = override
    if option is not None and option not in data_options():
        raise EvaluationError(f"data={option} is not a data option; options: {', '.join(data_options())}")
    return option, keys


def _check_keys(keys: Iterable[str], valid: Iterable[str], what: str) -> None:
    valid = sorted(valid)
    unknown = [key for key in keys if key.split(".")[0] not in valid]
    if unknown:
        raise EvaluationError(f"data.{unknown[0]} is not a key of {what}; keys: {', '.join(valid)}")


def _compose_data(option: str, overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={option}", *overrides])
    return OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))


def data_name(cfg: DictConfig, option: str | None = None) -> str:
    """A short name of a data config for file names: its option, preset, or datamodule class without "DataModule",
    and its task where it has one (VTAB-1k: `vtab1k-dtd`)."""
    name = option or cfg.get("preset") or re.sub(r"DataModule$", "", cfg._target_.rsplit(".", 1)[-1]).lower()
    task = cfg.get("task")
    return f"{name}-{task}" if task else name


def select_data(
    overrides: Sequence[str],
    recorded: DictConfig | None,
    image_size: int | None,
    options: Mapping[str, Any] | None = None,
) -> tuple[str, DictConfig]:
    """(name, resolved `data` config) chosen by `overrides` (see `add_eval_arguments`).

    Without ``data=NAME`` the `recorded` config is the base. A composed option gets the model's `image_size` and the
    recorded seed (which fixes the validation split) unless the overrides set them. `options` (batch_size, ...)
    apply last.
    """
    option, keys = parse_overrides(overrides)
    if option is None:
        if recorded is None:
            raise EvaluationError(
                "the source recorded no training data config; choose the data with data=NAME "
                f"(options: {', '.join(data_options())})"
            )
        _check_keys(keys, recorded, "the recorded data config")
        cfg = recorded.copy()
        for key, override in keys.items():
            OmegaConf.update(cfg, key, override.value(), merge=True)
        name = data_name(cfg)
    else:
        _check_keys(keys, _compose_data(option, []), f"data={option}")
        defaults = {"image_size": image_size, "seed": recorded.get("seed") if recorded else None}
        implied = [f"data.{k}={v}" for k, v in defaults.items() if v is not None and k not in keys]
        cfg = _compose_data(option, [*implied, *(override.input_line for override in keys.values())])
        name = data_name(cfg, option)
    return name, OmegaConf.merge(cfg, {k: v for k, v in (options or {}).items() if v is not None})


def build_eval_datamodule(args: argparse.Namespace, loaded: Loaded, overrides: Sequence[str] | None = None) -> EvalData:
    """The data `args` choose (see `add_eval_arguments`), with transforms for `loaded.model`, set up for `args.split`.

    `overrides` replace `args.overrides`. Refuses data whose class count differs from the model's.
    """
    name, cfg = select_data(
        args.overrides if overrides is None else overrides,
        loaded.data_cfg,
        loaded.image_size,
        {"batch_size": args.batch_size, "num_workers": args.num_workers},
    )
    try:
        datamodule = build_datamodule(cfg)
    except DataOptionError as err:  # the datamodule's own check of an option, naming the key and the valid values
        raise EvaluationError(f"data {name}: {err}") from None
    if datamodule.num_classes != loaded.num_classes:
        raise EvaluationError(
            f"the model has {loaded.num_classes} classes, data {name} has {datamodule.num_classes}; evaluate on data "
            "with the classes the model was trained on"
        )
    datamodule.data_config = model_data_config(loaded.model, cfg.image_size, cfg.crop_pct)
    datamodule.setup(_SPLIT_STAGES[args.split])
    return EvalData(datamodule, name, args.split, cfg)


def _table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in rows)


def named_source(argument: str) -> tuple[str, str] | None:
    """(name, source) of a NAME=SOURCE argument; None for a data override or a path that exists as written."""
    match = NAMED_SOURCE.match(argument)
    if match is None or match["name"] == "data" or Path(argument).expanduser().exists():
        return None
    return match["name"], match["path"]


def split_sources(arguments: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The named sources ({name: source}) and the data overrides among positional `arguments` that start with a
    named source; anything else is refused, as is a name given twice."""
    sources: dict[str, str] = {}
    overrides = []
    for argument in arguments:
        named = named_source(argument)
        if named is not None:
            name, path = named
            if name in sources:
                raise EvaluationError(
                    f"adapter name {name!r} is given twice ({name}={sources[name]}, {argument}); give each adapter "
                    "its own name"
                )
            sources[name] = path
        elif argument.startswith(("data=", "data.")):
            overrides.append(argument)
        else:
            raise EvaluationError(
                f"argument {argument!r} is neither NAME=SOURCE nor data=NAME or data.KEY=VALUE; to evaluate several "
                "adapters, name every source"
            )
    return sources, overrides


def adapter_overrides(entries: Sequence[str], names: Sequence[str]) -> dict[str, list[str]]:
    """`--data NAME:OVERRIDE` entries as each named adapter's list of data overrides."""
    overrides: dict[str, list[str]] = {name: [] for name in names}
    for entry in entries:
        name, colon, override = entry.partition(":")
        if not colon or not override:
            raise EvaluationError(
                f"--data {entry!r}: expected NAME:data=OPTION or NAME:data.KEY=VALUE, NAME one of the adapters "
                f"{', '.join(names)}"
            )
        if name not in overrides:
            raise EvaluationError(f"--data {entry}: no adapter is named {name!r}; adapters: {', '.join(names)}")
        overrides[name].append(override)
    return overrides


def _score(args: argparse.Namespace, loaded: Loaded, data: EvalData, device: torch.device) -> dict[str, Any]:
    """The record of `loaded` evaluated on `data`: scores, what was evaluated, the data config and versions."""
    scores = evaluate_model(
        loaded.model,
        data.dataloader(),
        loaded.num_classes,
        device,
        args.limit_batches,
        batch_transform=data.datamodule.batch_transform,
    )
    return {
        "source": str(loaded.source.path.resolve()),
        "kind": loaded.kind,
        "model": loaded.model_name,
        "data": data.name,
        "split": data.split,
        **scores,
        "limit_batches": args.limit_batches,
        "base_checkpoint": args.checkpoint,
        "data_config": OmegaConf.to_container(data.cfg),
        "versions": versions(),
    }


def _default_out(source: Source, data: EvalData) -> Path:
    return source.home / "eval" / f"{data.name}_{data.split}.json"


def evaluate_one(args: argparse.Namespace) -> dict[str, Any]:
    """`args.source` evaluated on the data `args.overrides` choose; the record, also written and printed."""
    device = resolve_device(args.device)
    source = locate_source(args.source)
    # Every data error (unknown option or key, no recorded data) surfaces before the model is built.
    select_data(args.overrides, source.data_cfg, source.image_size)
    loaded = load_source(source, args.checkpoint)
    data = build_eval_datamodule(args, loaded)
    record = _score(args, loaded, data, device)
    out = Path(args.out) if args.out else _default_out(source, data)
    write_json_atomic(out, record)
    rows = [("source", str(source.path)), ("data", data.name), ("split", data.split), ("images", str(record["images"]))]
    rows += [("top-1", f"{record['acc1']:.2%}"), ("top-5", f"{record['acc5']:.2%}"), ("loss", f"{record['loss']:.4f}")]
    print(f"{_table(rows)}\nwritten to {out}")
    return record


def _locate_adapter(name: str, path: str, overrides: Sequence[str]) -> Source:
    """The named adapter source, its data overrides checked; errors name the adapter."""
    try:
        source = locate_source(path)
        if source.kind == "merged":
            raise EvaluationError(
                f"{source.path} is a merged export, a whole model of its own; named sources are {ADAPTER_SOURCES}"
            )
        select_data(overrides, source.data_cfg, source.image_size)
    except UserError as err:
        raise EvaluationError(f"adapter {name!r} ({path}): {err}") from None
    return source


def _columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def evaluate_several(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each named source of `args` with its adapter active on one shared base model, on its own data; the records
    by name, each also written where evaluating its source alone would write it, with a summary line each."""
    sources, shared = split_sources([args.source, *args.overrides])
    if args.out:
        raise EvaluationError(
            "--out names one result file; with several adapters each result goes to <source dir>/eval/"
            "<data name>_<split>.json"
        )
    device = resolve_device(args.device)
    overrides = {name: [*shared, *own] for name, own in adapter_overrides(args.data, list(sources)).items()}
    # Every source and data error surfaces before the model is built.
    found = {name: _locate_adapter(name, path, overrides[name]) for name, path in sources.items()}
    model = load_adapters_onto_recorded_base({name: found[name].directory for name in found}, args.checkpoint)
    records: dict[str, dict[str, Any]] = {}
    rows = [("adapter", "data", "split", "images", "top-1", "top-5", "loss", "written to")]
    for name, source in found.items():
        set_active_adapters(model, name)
        loaded = Loaded(
            model=model,
            kind=source.kind,
            model_name=architecture(model),
            num_classes=head_classes(model),
            data_cfg=source.data_cfg,
            image_size=source.image_size,
            meta=source.meta,
            source=source,
        )
        try:
            data = build_eval_datamodule(args, loaded, overrides[name])
        except UserError as err:
            raise EvaluationError(f"adapter {name!r} ({source.path}): {err}") from None
        record = records[name] = {"adapter": name, **_score(args, loaded, data, device)}
        out = _default_out(source, data)
        write_json_atomic(out, record)
        scores = (f"{record['acc1']:.2%}", f"{record['acc5']:.2%}", f"{record['loss']:.4f}")
        rows.append((name, data.name, data.split, str(record["images"]), *scores, str(out)))
    print(_columns(rows))
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate one source (its record) or several named adapters (their records by name)."""
    parser = argparse.ArgumentParser(
        prog="python -m lora_vision.evaluate",
        description="Evaluate a run, adapter or merged export on a dataset; or several named adapters of one base "
        "model (NAME=SOURCE ...), each on its own data, with one backbone in memory.",
    )
    add_eval_arguments(parser)
    parser.add_argument("--out", help="result JSON (default: <source dir>/eval/<data name>_<split>.json)")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME:data=OPTION | NAME:data.KEY=VALUE",
        help="data of the named adapter NAME only (repeatable), after the data arguments given without a name",
    )
    args = parser.parse_intermixed_args(argv)
    with user_errors_as_messages(parser.prog):
        if named_source(args.source) is not None:
            return evaluate_several(args)
        if args.data:
            raise EvaluationError(
                f"--data {args.data[0]} names an adapter, but {args.source} is one unnamed source; name the sources "
                "(NAME=SOURCE ...) to evaluate several, or give its data as data=NAME / data.KEY=VALUE"
            )
        return evaluate_one(args)


if __name__ == "__main__":
    main()
