"""What the benchmark runs: models, LoRA configurations, reference baselines and the run settings."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import timm
from torch import nn

LORA, LINEAR_PROBE, FULL = "lora", "linear_probe", "full"
PRECISIONS = ("fp32", "bf16")
# What users switch on for speed or memory (conf/train.yaml `perf.*`, and `trainer.precision=bf16-mixed`).
BF16, COMPILE, CHANNELS_LAST, GRAD_CHECKPOINTING = "bf16", "compile", "channels_last", "grad_checkpointing"
OPTIONS = (BF16, COMPILE, CHANNELS_LAST, GRAD_CHECKPOINTING)


@dataclass(frozen=True)
class ModelSpec:
    """A timm model at random init (weights do not change the cost) and its default benchmark batch."""

    label: str
    timm_name: str
    batch_size: int
    image_size: int
    kwargs: tuple[tuple[str, Any], ...] = ()
    num_classes: int = 100

    def create(self) -> nn.Module:
        return timm.create_model(self.timm_name, pretrained=False, num_classes=self.num_classes, **dict(self.kwargs))


def _tiny_vit(label: str, dim: int, heads: int) -> ModelSpec:
    shape = (("depth", 2), ("embed_dim", dim), ("num_heads", heads), ("img_size", 32), ("patch_size", 8))
    return ModelSpec(label, "vit_small_patch16_224", 2, 32, shape)


# timm zero-initialises each residual branch's last BatchNorm, which would hide every adapter inside the branch
# from a comparison of outputs (the multi-adapter benchmark's check); the cost is the same either way.
RESNET_KWARGS = (("zero_init_last", False),)
# Batches are small so that the default run takes minutes on a 2-core CPU; --batch-size scales them up on a GPU.
MODELS: dict[str, ModelSpec] = {
    "vit_s16": ModelSpec("ViT-S/16 224px", "vit_small_patch16_224", 8, 224),
    "vit_b16": ModelSpec("ViT-B/16 224px", "vit_base_patch16_224", 4, 224),
    "resnet50": ModelSpec("ResNet-50 224px", "resnet50", 4, 224, RESNET_KWARGS),
    # The architecture of the pretrained EfficientNet users load (TensorFlow "same" padding on its strided convs):
    # 16 of its 49 convs are depthwise.
    "effnet_lite0": ModelSpec("EfficientNet-Lite0 224px", "tf_efficientnet_lite0", 8, 224),
}
# --quick keeps every configuration but swaps in models that run a step in milliseconds (for tests).
QUICK_MODELS: dict[str, ModelSpec] = {
    "vit_s16": _tiny_vit("tiny ViT (2 blocks, dim 64, 32px)", 64, 2),
    "vit_b16": _tiny_vit("tiny ViT (2 blocks, dim 96, 32px)", 96, 3),
    "resnet50": ModelSpec("ResNet-18 32px", "resnet18", 2, 32, RESNET_KWARGS),
    "effnet_lite0": ModelSpec("EfficientNet-Lite0 32px", "tf_efficientnet_lite0", 2, 32),
}


@dataclass(frozen=True)
class BenchConfig:
    """One row of the benchmark: LoRA on `targets` (restricted to `blocks`), or a reference baseline.

    PEFT's twin adapts exactly the modules ours adapts, each as a whole: where ours adapts q/v slices of a fused
    qkv layer, PEFT's peer is its only option, the whole qkv with one shared A (same parameter count).
    """

    model: str
    variant: str
    targets: tuple[str, ...] = ()
    blocks: str | None = None
    peft_peer: str = "same modules"
    # Why PEFT cannot build this configuration at all (then the row has no PEFT side).
    peft_refuses: str = ""
    # Time our adapters also as the same math from plain torch ops (what the fused nodes replaced).
    composed_side: bool = False

    @property
    def name(self) -> str:
        return f"{self.model}/{self.variant}"

    @property
    def method(self) -> str:
        return LORA if self.targets else self.variant


def _model_configs(model: str) -> list[BenchConfig]:
    return [BenchConfig(model, LINEAR_PROBE, peft_peer=""), BenchConfig(model, FULL, peft_peer="")]


def _vit_configs(model: str) -> list[BenchConfig]:
    return [
        BenchConfig(model, "qkv", ("qkv_fused",), composed_side=True),
        BenchConfig(model, "qv", ("qv",), peft_peer="whole qkv", composed_side=True),
        BenchConfig(model, "all_linear", ("all_linear",), composed_side=True),
        BenchConfig(model, "last4_all_linear", ("all_linear",), blocks="-4:", composed_side=True),
        *_model_configs(model),
    ]


CONFIGS: tuple[BenchConfig, ...] = (
    *_vit_configs("vit_s16"),
    *_vit_configs("vit_b16"),
    BenchConfig("resnet50", "conv3x3", ("conv3x3",), composed_side=True),
    BenchConfig("resnet50", "all_convs", ("all_convs",), composed_side=True),
    *_model_configs("resnet50"),
    BenchConfig("effnet_lite0", "conv1x1", ("conv1x1",), composed_side=True),
    # PEFT builds a grouped conv's adapter as grouped convs of its own and needs rank % groups == 0 (rank 32 for
    # the narrowest depthwise conv here, 1152 for the widest), so it has no rank-8 twin.
    BenchConfig(
        "effnet_lite0",
        "all_convs",
        ("all_convs",),
        peft_peer="",
        peft_refuses="depthwise convs need rank % groups == 0",
        composed_side=True,
    ),
    *_model_configs("effnet_lite0"),
)


# Each option timed against the same configuration without it, where users would reach for it.
OPTION_ROWS: tuple[tuple[str, str], ...] = (
    ("vit_s16/qv", BF16),
    ("vit_s16/qv", COMPILE),
    ("vit_s16/all_linear", GRAD_CHECKPOINTING),
    ("resnet50/conv3x3", CHANNELS_LAST),
    ("resnet50/conv3x3", BF16),
    ("resnet50/conv3x3", COMPILE),
)


def select_options(configs: Sequence[BenchConfig], options: Sequence[str]) -> list[tuple[BenchConfig, str]]:
    """The option rows among `configs` for the named `options`, in benchmark order."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"--options {unknown} are not options; choose from {', '.join(OPTIONS)}")
    by_name = {config.name: config for config in configs}
    return [(by_name[name], option) for name, option in OPTION_ROWS if name in by_name and option in options]


def select_configs(patterns: Sequence[str] | None) -> list[BenchConfig]:
    """Configurations whose name matches any glob (e.g. ``vit_s16/*``, ``*/qv``), in benchmark order."""
    if not patterns:
        return list(CONFIGS)
    names = [c.name for c in CONFIGS]
    unknown = [p for p in patterns if not fnmatch.filter(names, p)]
    if unknown:
        raise ValueError(f"--configs {unknown} match no configuration; choose from {', '.join(names)}")
    return [c for c in CONFIGS if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def select_lora_configs(patterns: Sequence[str]) -> list[BenchConfig]:
    """The LoRA configurations among those the globs name, for the tools that compare adapters; a message naming
    the patterns where they match no configuration or only the baselines, which have no adapters."""
    try:
        configs = [config for config in select_configs(patterns) if config.targets]
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if not configs:
        raise SystemExit(
            f"--configs {list(patterns)}: no LoRA configuration among them (the baselines have no adapters)"
        )
    return configs


@dataclass(frozen=True)
class Settings:
    """How every configuration is run; the same for all sides of a row."""

    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int | None = None
    warmup: int = 1
    repeats: int = 5
    # Each comparison is timed (and its memory measured) in this many runs; a threshold holds only where every run
    # meets it.
    runs: int = 3
    steps: int = 1
    memory_steps: int = 2
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    lr: float = 1e-4
    seed: int = 0
    quick: bool = False
    memory: bool = True
    inference: bool = True
    # perf options applied to our side (lora_vision.performance), and the torch.compile backend they use.
    options: tuple[str, ...] = ()
    compile_backend: str = "inductor"

    def model(self, config: BenchConfig) -> ModelSpec:
        return (QUICK_MODELS if self.quick else MODELS)[config.model]

    def batch(self, spec: ModelSpec) -> int:
        return self.batch_size or spec.batch_size

    def with_option(self, option: str) -> Settings:
        """These settings plus one speed or memory option."""
        if option == BF16:
            return dataclasses.replace(self, precision=BF16)
        return dataclasses.replace(self, options=(*self.options, option))


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (a number of warm-up rounds)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    value = int(text)
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def settings_from(args: argparse.Namespace, quick: Settings, **extra: Any) -> Settings:
    """The `Settings` of a benchmark command line: `quick`'s with --quick (else the defaults), then its options."""
    defaults = quick if args.quick else Settings()
    keys = ("steps", "repeats", "warmup", "runs")
    given = {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}
    return dataclasses.replace(
        defaults,
        **given,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        quick=args.quick,
        memory=args.memory,
        **extra,
    )


def adapter_tool_parser(
    prog: str, description: str, default_configs: Sequence[str], stem: str, repeats_help: str | None = None
) -> argparse.ArgumentParser:
    """The command line the CPU tools that compare adapters share (`bench.traffic`, `bench.layers`): which
    configurations, how many runs and rounds, tiny models for tests, and where `stem`.md/.json go."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--configs", nargs="+", default=list(default_configs), metavar="GLOB")
    parser.add_argument("--runs", type=positive_int)
    parser.add_argument("--repeats", type=positive_int, help=repeats_help)
    parser.add_argument("--warmup", type=non_negative_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 run of 2 rounds (for tests)")
    parser.add_argument("--out", help=f"directory for {stem}.md and {stem}.json")
    return parser


def cpu_settings(args: argparse.Namespace) -> Settings:
    """The settings of an `adapter_tool_parser` command line: CPU, fp32, no memory children."""
    args.device, args.precision, args.memory = "cpu", "fp32", False
    return settings_from(args, Settings(warmup=1, repeats=2, runs=1))
