"""Fine-tuning methods a study compares: LoRA and the two baselines every LoRA study needs.

Each is a small object Hydra instantiates from the `lora/` config group (`_target_`). The constructor validates
its settings, so a bad value fails before any model is built; `apply(model)` prepares the model in place and
returns its parameter budget; `describe()` is what results files record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from lora_vision.lora import ParameterSummary, apply_lora, freeze_backbone, summarize
from lora_vision.lora.errors import LoRAConfigError, check_hyperparameters


def _plain(value: Any) -> Any:
    # Hydra hands lists over as ListConfig; results files and error messages want plain Python values.
    return OmegaConf.to_container(value) if isinstance(value, ListConfig | DictConfig) else value


class LoRA:
    """Low-rank adapters on `targets` (see `lora_vision.lora.apply_lora` for every option)."""

    name = "lora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        targets: str | Sequence[str] = ("qv",),
        blocks: int | str | Sequence[int] | None = None,
        train_head: bool = True,
    ) -> None:
        check_hyperparameters(rank, alpha, dropout)
        targets = _plain(targets)
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise LoRAConfigError(f"lora.targets must be a non-empty list of strings, got {targets!r}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.blocks = _plain(blocks)
        self.train_head = train_head

    def apply(self, model: nn.Module) -> ParameterSummary:
        return apply_lora(model, self.targets, self.rank, self.alpha, self.dropout, self.blocks, self.train_head)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "rank": self.rank,
            "alpha": float(self.rank if self.alpha is None else self.alpha),
            "dropout": self.dropout,
            "targets": self.targets,
            "blocks": self.blocks,
        }


class _Baseline:
    """A method without adapters.

    It accepts the LoRA settings an experiment carries and ignores them, so `+exp=vit_r8 lora=linear_probe`
    works: Hydra merges the experiment's `lora.rank`, `lora.targets`, ... into whichever `lora` option is
    chosen. Any other key is still an error.
    """

    name: str

    def __init__(
        self,
        rank: int | None = None,
        alpha: float | None = None,
        dropout: float | None = None,
        targets: str | Sequence[str] | None = None,
        blocks: int | str | Sequence[int] | None = None,
        train_head: bool = True,
    ) -> None:
        if not train_head:
            raise LoRAConfigError(f"lora.train_head=false leaves nothing to train for the {self.name} baseline")

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "rank": None, "alpha": None, "dropout": None, "targets": None, "blocks": None}


class LinearProbe(_Baseline):
    """Train only the classifier head on a frozen backbone."""

    name = "linear_probe"

    def apply(self, model: nn.Module) -> ParameterSummary:
        freeze_backbone(model, train_head=True)
        return summarize(model)


class FullFineTune(_Baseline):
    """Train every parameter."""

    name = "full"

    def apply(self, model: nn.Module) -> ParameterSummary:
        model.requires_grad_(True)
        return summarize(model)
