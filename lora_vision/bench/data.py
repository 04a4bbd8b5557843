"""Input-pipeline throughput against what the model consumes, for the standard experiments.

    python -m lora_vision.bench.data [--experiments NAME ...] [--pipelines pil batched] [--device cpu|cuda]
        [--workers N|auto ...] [--batches N] [--model-batch-size N] [--model-steps N] [--data-root DIR]
        [--threads N] [--quick] [--out DIR] [data.KEY=VALUE ...]

For each experiment of ``conf/exp/`` (default: vit_r8, cifar10_effnet, imagewoof_effnet) it measures

- the images per second the training DataLoader delivers, with the experiment's workers (or ``--workers``),
  moved to the device and through the datamodule's batch step, for the per-image PIL pipeline and, where the
  images have one fixed size, the batched one (``resize_on_device``);
- the images per second the experiment's model consumes in a training step (forward, backward, AdamW) with its
  fine-tuning method, at random init, on the same device, under the trainer's mixed precision on CUDA;

and prints a Markdown table (written to ``DIR/data_pipeline.md`` with ``--out``). Without ``--data-root`` it
runs on generated data: CIFAR-like 32 px JPEGs and Imagewoof-like JPEGs with a 160 px shorter side, a few
hundred of them, in a temporary directory. ``data.KEY=VALUE`` overrides apply to every experiment.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import PIL
import timm
import torch
import torch.nn.functional as F
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from lora_vision.bench.configs import positive_int
from lora_vision.builders import build_backbone, build_datamodule, build_method, build_module
from lora_vision.data import CIFARDataModule, ImageDataModule, ImageNetSubsetDataModule
from lora_vision.data.base import resolve_num_workers
from lora_vision.models import model_data_config
from lora_vision.results import PROJECT_ROOT, write_atomic

EXPERIMENTS = ("vit_r8", "cifar10_effnet", "imagewoof_effnet")
PIPELINES = ("pil", "batched")
MIN_RATIO = 2.0  # the pipeline must deliver at least twice what the model consumes
OUT_FILE = "data_pipeline.md"
# A CPU step of ViT-B/16 at batch 64 needs ~13 GiB and half a minute; img/s hardly depends on the batch there.
CPU_MODEL_BATCH = 8
_AUTOCAST = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


@dataclass(frozen=True)
class Settings:
    device: str
    workers: tuple[int | str, ...] | None
    batches: int
    model_batch_size: int | None
    model_steps: int
    model_warmup: int


@dataclass(frozen=True)
class Row:
    experiment: str
    model: str
    data: str
    pipeline: str
    workers: int
    batch_size: int
    pipeline_ips: float
    model_batch_size: int
    precision: str
    model_ips: float

    @property
    def ratio(self) -> float:
        return self.pipeline_ips / self.model_ips


def compose_experiment(name: str, overrides: Sequence[str]) -> DictConfig:
    """The parts of the run config of ``+exp=name`` with ``overrides`` the benchmark needs, resolved.

    Groups ``model``, ``lora``, ``data``, ``optim``, ``module``, and ``precision`` (the trainer's).
    """
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"exp={name}", *overrides])
    # Only what the benchmark uses: paths.output_dir (and the trainer's paths) would need Hydra's runtime.
    used = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "lora", "data", "optim", "module")}
    return OmegaConf.create({**used, "precision": cfg.trainer.precision})


def write_fake_data(dm: ImageDataModule, images: int, seed: int = 0) -> None:
    """Fill ``dm.root`` with about ``images`` training JPEGs (spread over the classes) and one test image per class.

    CIFAR datamodules get 32x32 images; ImageNet subsets a 160 px shorter side and a random aspect ratio up to
    3:2, as in fast.ai's ``imagewoof2-160``. The content is smooth noise, so JPEG sizes and decode times are
    those of photographs rather than of flat colour.
    """
    if isinstance(dm, CIFARDataModule):
        folders, splits = list(dm.classes), ("train", "test")

        def size(_: torch.Generator) -> tuple[int, int]:
            return dm.source_size

    elif isinstance(dm, ImageNetSubsetDataModule):
        folders, splits = dm.wnids, ("train", "val")

        def size(generator: torch.Generator) -> tuple[int, int]:
            longer = int(torch.randint(160, 241, (1,), generator=generator))
            return (160, longer) if torch.rand(1, generator=generator) < 0.5 else (longer, 160)

    else:
        raise ValueError(f"no generated data for {type(dm).__name__}; point --data-root at real data")
    generator = torch.Generator().manual_seed(seed)
    per_class = {splits[0]: math.ceil(images / len(folders)), splits[1]: 1}
    for split, count in per_class.items():
        for folder in folders:
            directory = dm.root / split / folder
            directory.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                height, width = size(generator)
                coarse = torch.rand(1, 3, 6, 6, generator=generator)
                pixels = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
                pixels = pixels + 0.08 * torch.randn(pixels.shape, generator=generator)
                array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(array).save(directory / f"{index:05d}.jpg", quality=90)


def _endless(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pipeline_throughput(dm: ImageDataModule, device: torch.device, batches: int) -> float:
    """Training images per second out of ``dm``'s loader, on ``device`` and through its batch step.

    The first batches of a fresh loader arrive from every worker at once (each prefetches two), so they are
    taken untimed; after them, batches arrive at the rate the workers sustain.
    """
    loader = dm.train_dataloader()
    stream = _endless(loader)
    warmup = 1 + 2 * dm.num_workers
    for _ in range(warmup):
        next(stream)
    _sync(device)
    started, images = time.perf_counter(), 0
    for _ in range(batches):
        inputs, targets = next(stream)
        dm.batch_transform(inputs.to(device, non_blocking=True), training=True)
        images += len(targets)
    _sync(device)
    return images / (time.perf_counter() - started)


def model_throughput(
    cfg: DictConfig, model: nn.Module, num_classes: int, batch_size: int, device: torch.device, steps: int, warmup: int
) -> tuple[float, str]:
    """(images per second, precision) of the experiment's training step on ``model``, on one fixed batch.

    The experiment's method is applied to ``model`` (in place) first.
    """
    method = build_method(cfg.lora)
    method.apply(model)
    module = build_module(cfg, model, num_classes, method).to(device)
    module.train()
    optimizer = torch.optim.AdamW(module.param_groups(), lr=cfg.optim.lr)
    size = cfg.data.image_size
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(num_classes, (batch_size,), device=device)
    dtype = _AUTOCAST.get(cfg.precision) if device.type == "cuda" else None
    precision = cfg.precision if dtype is not None else "32-true"

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            loss = module.criterion(module(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = []
    for index in range(warmup + steps):
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
    return batch_size / statistics.median(seconds), precision


def _data_label(cfg: DictConfig, dm: ImageDataModule) -> str:
    name = cfg.data.get("preset") or type(dm).__name__.removesuffix("DataModule")
    source = "x".join(map(str, dm.source_size)) if dm.source_size else "varying"
    return f"{name} {source} -> {cfg.data.image_size} px"


def bench_experiment(
    name: str, settings: Settings, overrides: Sequence[str], pipelines: Sequence[str], *, generate: bool = False
) -> list[Row]:
    """The rows of one experiment: each pipeline it supports at each worker count, against its model's step.

    With ``generate``, images are written where the experiment's data config expects them, unless already there.
    """
    cfg = compose_experiment(name, overrides)
    device = torch.device(settings.device)
    target = get_class(cfg.data._target_)
    workers = [resolve_num_workers(w) for w in settings.workers or (cfg.data.num_workers,)]
    if generate:
        # Generated data is small: no subset of it, and the test split serves as validation.
        cfg.data.merge_with({"train_subset": None, "val_fraction": 0})
    if "download" in cfg.data:
        cfg.data.download = False
    pipelines = [p for p in pipelines if p == "pil" or target.source_size is not None]
    num_classes = build_datamodule(cfg.data).num_classes
    model_batch = settings.model_batch_size or cfg.data.batch_size
    if device.type == "cpu" and settings.model_batch_size is None:
        model_batch = min(model_batch, CPU_MODEL_BATCH)
    torch.manual_seed(0)
    # Random init: the weights do not change the cost.
    model = build_backbone(cfg.model, num_classes, random_init=True)
    data_config = model_data_config(model, cfg.data.image_size, cfg.data.crop_pct)
    model_ips, precision = model_throughput(
        cfg, model, num_classes, model_batch, device, settings.model_steps, settings.model_warmup
    )
    del model
    rows = []
    for pipeline in pipelines:
        for count in workers:
            cfg.data.merge_with({"resize_on_device": pipeline == "batched", "num_workers": count})
            dm = build_datamodule(cfg.data)
            if generate and not dm.root.exists():
                write_fake_data(dm, (1 + 2 * max(workers) + settings.batches) * cfg.data.batch_size)
            dm.data_config = data_config
            rows.append(
                Row(
                    experiment=name,
                    model=cfg.model.name,
                    data=_data_label(cfg, dm),
                    pipeline=pipeline,
                    workers=count,
                    batch_size=cfg.data.batch_size,
                    pipeline_ips=pipeline_throughput(dm, device, settings.batches),
                    model_batch_size=model_batch,
                    precision=precision,
                    model_ips=model_ips,
                )
            )
    return rows


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.partition(":")[2].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def machine(device: str) -> str:
    """One line naming what decides the numbers: processor(s), cores, threads and library versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{_cpu_name()}, {cores} usable cores, torch threads {torch.get_num_threads()}"]
    if torch.device(device).type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}
    parts.append(", ".join(f"{k} {v}" for k, v in {**versions, "Pillow": PIL.__version__}.items()))
    return "; ".join(parts)


def markdown(rows: Sequence[Row], header: dict[str, str]) -> str:
    """The report: what was run where, the table, and how to read it."""
    lines = ["# Data pipeline throughput", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    columns = [
        "experiment",
        "model",
        "data",
        "pipeline",
        "workers",
        "batch",
        "pipeline img/s",
        "model img/s (batch, precision)",
        "pipeline / model",
        f">= {MIN_RATIO:g}x",
    ]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [
            row.experiment,
            row.model,
            row.data,
            row.pipeline,
            str(row.workers),
            str(row.batch_size),
            f"{row.pipeline_ips:,.0f}",
            f"{row.model_ips:,.1f} ({row.model_batch_size}, {row.precision})",
            f"{row.ratio:,.1f}",
            "yes" if row.ratio >= MIN_RATIO else "**no**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "pipeline img/s: training images per second out of the experiment's training DataLoader (its transforms,",
        "workers and batch size), moved to the device and through the datamodule's batch step: `pil` resizes and",
        "normalizes each image in the workers, `batched` (`resize_on_device`) only augments at the source size there",
        "and resizes whole uint8 batches on the device. model img/s: the median training step (forward, backward,",
        "AdamW) of the experiment's model and method at random init on the same device. Both are measured apart, so on",
        "a CPU, where loading and training share the cores, the ratio is an upper bound.",
    ]
    return "\n".join(lines) + "\n"


def _workers(text: str) -> int | str:
    return text if text == "auto" else resolve_num_workers(int(text))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_vision.bench.data",
        description="Images/s of the input pipeline against images/s of the training step, per experiment.",
    )
    parser.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE", help="Hydra overrides for every experiment")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), help="conf/exp names")
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--workers", nargs="+", type=_workers, help="worker counts or auto (default: the config's)")
    parser.add_argument("--batches", type=positive_int, help="timed batches per pipeline (default 10)")
    parser.add_argument(
        "--model-batch-size", type=positive_int, help=f"default: the experiment's (at most {CPU_MODEL_BATCH} on CPU)"
    )
    parser.add_argument("--model-steps", type=positive_int, help="timed training steps (default 3)")
    parser.add_argument("--data-root", type=Path, help="real data (paths.data_dir) instead of generated images")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's; 1 on a busy CPU)")
    parser.add_argument("--quick", action="store_true", help="32 px inputs, tiny batches, one step (for tests)")
    parser.add_argument("--out", type=Path, help=f"write DIR/{OUT_FILE}")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        device=args.device,
        workers=tuple(args.workers) if args.workers else None,
        batches=args.batches or (2 if args.quick else 10),
        model_batch_size=args.model_batch_size or (2 if args.quick else None),
        model_steps=args.model_steps or (1 if args.quick else 3),
        model_warmup=0 if args.quick else 1,
    )


def run(args: argparse.Namespace, settings: Settings) -> list[Row]:
    """Every row ``args`` ask for, on generated data in a temporary directory unless ``--data-root`` is given."""
    overrides = (["data.image_size=32", "data.batch_size=8"] if args.quick else []) + list(args.overrides)
    if args.data_root is not None:
        overrides = [f"paths.data_dir={args.data_root}", *overrides]
        return [row for name in args.experiments for row in bench_experiment(name, settings, overrides, args.pipelines)]
    with tempfile.TemporaryDirectory(prefix="lora_vision_data_bench_") as root:
        overrides = [f"paths.data_dir={root}", *overrides]
        return [
            row
            for name in args.experiments
            for row in bench_experiment(name, settings, overrides, args.pipelines, generate=True)
        ]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    try:
        settings = settings_from(args)
        rows = run(args, settings)
        header = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": f"`{shlex.join(['python', '-m', 'lora_vision.bench.data', *argv])}`",
            "machine": machine(args.device),
            "device": args.device,
            "timing": (
                f"{settings.batches} timed batches per pipeline after 1 + 2 x workers untimed ones; model: median "
                f"of {settings.model_steps} steps after {settings.model_warmup} untimed"
            ),
            "data": "generated JPEGs in a temporary directory" if args.data_root is None else str(args.data_root),
            "load average (1 min) at start / end": f"{load_start:.2f} / {os.getloadavg()[0]:.2f}",
            "wall time": f"{time.perf_counter() - started:.0f} s",
        }
    finally:
        torch.set_num_threads(threads)
    text = markdown(rows, header)
    print(text)
    if args.out:
        write_atomic(args.out / OUT_FILE, text)
        print(f"wrote {args.out / OUT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
