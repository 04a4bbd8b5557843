"""Fine-tuning methods a study compares: LoRA (and its variants) and the baselines every LoRA study needs.

Each is a small object Hydra instantiates from the `lora/` config group (`_target_`). The constructor validates
its settings, so a bad value fails before any model is built; `apply(model)` prepares the model in place and
returns its parameter budget; `describe()` is what results files record; `config()` rebuilds an equal method
(what adapter files store); `lr_ratios()` asks the optimizer for per-parameter learning-rate multipliers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from lora_vision.lora import ParameterSummary, apply_lora, freeze_backbone, summarize
from lora_vision.lora.errors import LoRAConfigError, check_hyperparameters, is_positive_number
from lora_vision.lora.layers import INITS, variant_name


def _plain(value: Any) -> Any:
    # Hydra hands lists and dicts over as ListConfig/DictConfig; results files and messages want plain values.
    return OmegaConf.to_container(value) if isinstance(value, ListConfig | DictConfig) else value


def _target(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _pattern(value: Any, key: str) -> dict[str, Any]:
    value = _plain(value)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LoRAConfigError(f"lora.{key} must be a mapping of module-name pattern to value, got {value!r}")
    return dict(value)


class LoRA:
    """Low-rank adapters on `targets` (see `lora_vision.lora.apply_lora` for every option).

    `loraplus_lr_ratio` (LoRA+, Hayou et al., 2024, arXiv:2402.12354) trains B with that multiple of the
    learning rate; the paper recommends about 16.
    """

    name = "lora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        targets: str | Sequence[str] = ("qv",),
        blocks: int | str | Sequence[int] | None = None,
        train_head: bool = True,
        rslora: bool = False,
        dora: bool = False,
        init: str = "lora",
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float] | None = None,
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        check_hyperparameters(rank, alpha, dropout)
        targets = _plain(targets)
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise LoRAConfigError(f"lora.targets must be a non-empty list of strings, got {targets!r}")
        if init not in INITS:
            raise LoRAConfigError(f"lora.init={init!r} is not one of {', '.join(INITS)}")
        for key, value in {"rslora": rslora, "dora": dora, "train_head": train_head}.items():
            if not isinstance(value, bool):
                raise LoRAConfigError(f"lora.{key} must be true or false, got {value!r}")
        if loraplus_lr_ratio is not None and not is_positive_number(loraplus_lr_ratio):
            raise LoRAConfigError(f"lora.loraplus_lr_ratio must be a number > 0 or null, got {loraplus_lr_ratio!r}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.blocks = _plain(blocks)
        self.train_head = train_head
        self.rslora, self.dora, self.init = rslora, dora, init
        self.rank_pattern = _pattern(rank_pattern, "rank_pattern")
        self.alpha_pattern = _pattern(alpha_pattern, "alpha_pattern")
        self.loraplus_lr_ratio = None if loraplus_lr_ratio is None else float(loraplus_lr_ratio)

    def apply(self, model: nn.Module) -> ParameterSummary:
        return apply_lora(
            model,
            self.targets,
            self.rank,
            self.alpha,
            self.dropout,
            self.blocks,
            self.train_head,
            rslora=self.rslora,
            dora=self.dora,
            init=self.init,
            rank_pattern=self.rank_pattern,
            alpha_pattern=self.alpha_pattern,
        )

    @property
    def variant(self) -> str:
        return variant_name(self.dora, self.init, self.rslora, loraplus=self.loraplus_lr_ratio is not None)

    def lr_ratios(self) -> dict[str, float]:
        return {} if self.loraplus_lr_ratio is None else {"lora_B": self.loraplus_lr_ratio}

    def config(self) -> dict[str, Any]:
        settings = {key: getattr(self, key) for key in inspect.signature(LoRA).parameters}
        return {"_target_": _target(self), **settings}

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "variant": self.variant,
            "rank": self.rank,
            "alpha": float(self.rank if self.alpha is None else self.alpha),
            "dropout": self.dropout,
            "targets": self.targets,
            "blocks": self.blocks,
            "rank_pattern": self.rank_pattern or None,
            "alpha_pattern": self.alpha_pattern or None,
            "loraplus_lr_ratio": self.loraplus_lr_ratio,
        }


LORA_SETTINGS = frozenset(inspect.signature(LoRA).parameters) - {"train_head"}


class _Baseline:
    """A method without adapters.

    It accepts the LoRA settings an experiment carries and ignores them, so `+exp=vit_r8 lora=linear_probe`
    works: Hydra merges the experiment's `lora.rank`, `lora.targets`, ... into whichever `lora` option is
    chosen. Any other key is still an error.
    """

    name: str

    def __init__(self, train_head: bool = True, **lora_settings: Any) -> None:
        unknown = sorted(set(lora_settings) - LORA_SETTINGS)
        if unknown:
            raise LoRAConfigError(f"{self.name} got unknown settings {unknown}; valid: {sorted(LORA_SETTINGS)}")
        if not train_head:
            raise LoRAConfigError(f"lora.train_head=false leaves nothing to train for the {self.name} baseline")

    def lr_ratios(self) -> dict[str, float]:
        return {}

    def config(self) -> dict[str, Any]:
        return {"_target_": _target(self)}

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **dict.fromkeys(("variant", "rank", "alpha", "dropout", "targets", "blocks"))}


class LinearProbe(_Baseline):
    """Train only the classifier head on a frozen backbone."""

    name = "linear_probe"

    def apply(self, model: nn.Module) -> ParameterSummary:
        freeze_backbone(model, train_head=True)
        return summarize(model)


class BitFit(_Baseline):
    """Train every bias (of linear, conv and norm layers) and the classifier head (Ben Zaken et al., 2022).

    BatchNorm layers whose bias trains count as not frozen, so they normalise with batch statistics and update
    their running statistics during training, as under full fine-tuning.
    """

    name = "bitfit"

    def apply(self, model: nn.Module) -> ParameterSummary:
        freeze_backbone(model, train_head=True)
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.requires_grad_(True)
        return summarize(model)


class FullFineTune(_Baseline):
    """Train every parameter."""

    name = "full"

    def apply(self, model: nn.Module) -> ParameterSummary:
        model.requires_grad_(True)
        return summarize(model)
