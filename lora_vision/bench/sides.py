"""Building each side of a benchmark row from one timm model, and the training step they all run."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_vision.bench.configs import COMPILE, FULL, LINEAR_PROBE, LORA, BenchConfig, ModelSpec, Settings
from lora_vision.bench.floor import attach_floor
from lora_vision.bench.peft_side import peft_adapted_names, peft_twin, peft_version
from lora_vision.lora import LoraAdapter, LoRAConv2d, LoRALinear, apply_lora, resolve_targets
from lora_vision.methods import FullFineTune, LinearProbe
from lora_vision.performance import apply_performance_options

OURS, PEFT, FLOOR, COMPOSED = "ours", "peft", "floor", "composed"


class _ComposedOps:
    """A LoRA layer computing its function from plain torch ops (`LoraAdapter.forward_with_base`), as it did before
    the fused autograd nodes (`lora_vision.lora.fused`, `fused_conv`): the same parameters and math, timed to show
    what the nodes gain."""

    def forward(self, x: Tensor) -> Tensor:
        return LoraAdapter.forward_with_base(self._single(), x)


class ComposedLoRALinear(_ComposedOps, LoRALinear):
    pass


class ComposedLoRAConv2d(_ComposedOps, LoRAConv2d):
    pass


COMPOSED_CLASSES = {LoRALinear: ComposedLoRALinear, LoRAConv2d: ComposedLoRAConv2d}


def use_composed_ops(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) in COMPOSED_CLASSES:
            module.__class__ = COMPOSED_CLASSES[type(module)]


def build_base(spec: ModelSpec, settings: Settings) -> nn.Module:
    """The model every side starts from; seeded, so a child process rebuilds the same weights."""
    torch.manual_seed(settings.seed)
    return spec.create().to(settings.device)


def make_batch(spec: ModelSpec, settings: Settings) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(settings.seed)
    size = settings.batch(spec)
    images = torch.randn(size, 3, spec.image_size, spec.image_size, generator=generator)
    labels = torch.randint(0, spec.num_classes, (size,), generator=generator)
    return images.to(settings.device), labels.to(settings.device)


def adapted_names(model: nn.Module, config: BenchConfig) -> list[str]:
    return [target.name for target in resolve_targets(model, config.targets, config.blocks)]


def prepare_side(model: nn.Module, config: BenchConfig, side: str, settings: Settings) -> nn.Module:
    """`model` (taken over, possibly wrapped) as the given side of the row, with `settings.options`, in train mode.

    LoRA rows train only the adapters on every side (no head), so ours and PEFT train the same parameters.
    """
    if config.method == LINEAR_PROBE:
        LinearProbe().apply(model)
    elif config.method == FULL:
        FullFineTune().apply(model)
    elif side in (OURS, COMPOSED):
        apply_lora(
            model,
            config.targets,
            rank=settings.rank,
            alpha=settings.alpha,
            dropout=settings.dropout,
            blocks=config.blocks,
            train_head=False,
        )
        if side == COMPOSED:
            use_composed_ops(model)
    elif side == PEFT:
        names = adapted_names(model, config)
        model = peft_twin(model, names, settings.rank, settings.alpha, settings.dropout)
        if sorted(peft_adapted_names(model)) != sorted(names):
            raise RuntimeError(f"PEFT adapted {peft_adapted_names(model)}, not {names}")
    elif side == FLOOR:
        attach_floor(model, adapted_names(model, config))
    else:
        raise ValueError(f"unknown side {side!r}")
    if settings.options:
        flags = {option: True for option in settings.options}
        if COMPILE in flags:
            flags[COMPILE] = {"backend": settings.compile_backend}
        apply_performance_options(model, **flags)
    return model.train()


class Row(NamedTuple):
    """What one benchmark row runs on: the model spec, the unadapted model, one batch, and every side's model."""

    spec: ModelSpec
    base: nn.Module
    images: Tensor
    labels: Tensor
    models: dict[str, nn.Module]


def build_row(config: BenchConfig, settings: Settings, sides: Sequence[str] | None = None) -> Row:
    """The base model and batch of `config`, and each of `sides` (default: `sides_of` the row, PEFT where it is
    installed) prepared from its own copy of the base."""
    spec = settings.model(config)
    base = build_base(spec, settings)
    images, labels = make_batch(spec, settings)
    sides = sides_of(config, with_peft=peft_version() is not None) if sides is None else sides
    models = {side: prepare_side(copy.deepcopy(base), config, side, settings) for side in sides}
    return Row(spec, base, images, labels, models)


def sides_of(config: BenchConfig, with_peft: bool) -> Sequence[str]:
    if config.method != LORA:
        return (OURS,)
    sides = (OURS, PEFT, FLOOR) if with_peft and not config.peft_refuses else (OURS, FLOOR)
    return (*sides, COMPOSED) if config.composed_side else sides


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def autocast(settings: Settings) -> contextlib.AbstractContextManager:
    if settings.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(settings.device).type, dtype=torch.bfloat16)


class TrainStep:
    """One training step: forward, cross-entropy, backward, AdamW over the trainable parameters, zero_grad.

    The floor has no trainable parameters, hence no optimizer: its step is forward and backward only.
    """

    def __init__(self, model: nn.Module, images: Tensor, labels: Tensor, settings: Settings) -> None:
        self.model, self.images, self.labels, self.settings = model, images, labels, settings
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr) if params else None

    def __call__(self) -> None:
        with autocast(self.settings):
            loss = F.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def inference_step(model: nn.Module, images: Tensor, settings: Settings) -> Callable[[], None]:
    """A forward pass in eval mode under `torch.inference_mode()`."""
    model.eval()

    def run() -> None:
        with torch.inference_mode(), autocast(settings):
            model(images)

    return run
