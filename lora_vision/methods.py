"""Fine-tuning methods a study compares: LoRA (and its variants) and the baselines every LoRA study needs.

Each is a small object Hydra instantiates from the `lora/` config group (`_target_`). The constructor validates
its settings, so a bad value fails before any model is built; `apply(model)` prepares the model in place and
returns its parameter budget; `describe()` is what results files record; `config()` is the method as plain data,
its name in `METHODS` and its settings (what adapter files store), from which `method_from_config` rebuilds an
equal method without importing or calling anything the record names; `lr_ratios(model)` asks the optimizer for
learning-rate multipliers by parameter name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from lora_vision.lora import ParameterSummary, apply_lora, freeze_backbone, named_lora_layers, summarize
from lora_vision.lora.config import RECORDED, SETTINGS, LoraConfig
from lora_vision.lora.errors import LoRAConfigError
from lora_vision.lora.layers import ADAPTERS, DEFAULT_ADAPTER


def _plain(value: Any) -> Any:
    # Hydra hands lists and dicts over as ListConfig/DictConfig; results files and messages want plain values.
    return OmegaConf.to_container(value) if isinstance(value, ListConfig | DictConfig) else value


class LoRA:
    """Low-rank adapters; `LoraConfig` holds, validates and documents every setting.

    The settings read as the method's own attributes (`method.rank`, `method.targets`, `method.variant`).
    """

    name = "lora"

    def __init__(self, **settings: Any) -> None:
        self.settings = LoraConfig.from_settings({key: _plain(value) for key, value in settings.items()})

    def __getattr__(self, name: str) -> Any:
        if name in SETTINGS or name == "variant":
            return getattr(self.__dict__["settings"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def apply(self, model: nn.Module) -> ParameterSummary:
        return apply_lora(model, self.settings)

    def lr_ratios(self, model: nn.Module) -> dict[str, float]:
        """LoRA+: the ratio for the B factor of each adapter this method added to `model` (the `default` ones), by
        parameter name; the B factors of other adapters on the same layers keep their own learning rate."""
        ratio = self.settings.loraplus_lr_ratio
        if ratio is None:
            return {}
        return {
            f"{layer_name}.{ADAPTERS}.{DEFAULT_ADAPTER}.lora_B": ratio
            for layer_name, layer in named_lora_layers(model).items()
            if DEFAULT_ADAPTER in layer.adapters
        }

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings.settings()}

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **self.settings.describe()}


LORA_SETTINGS = frozenset(SETTINGS) - {"train_head"}


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

    def lr_ratios(self, model: nn.Module) -> dict[str, float]:
        return {}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "settings": {}}

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **dict.fromkeys(RECORDED)}


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


Method = LoRA | LinearProbe | BitFit | FullFineTune
# Every method an adapter file may name, by name: the only classes `method_from_config` builds.
METHODS: dict[str, type[Method]] = {method.name: method for method in (LoRA, LinearProbe, BitFit, FullFineTune)}


def method_from_config(config: Mapping[str, Any]) -> Method:
    """The method a `config()` record describes: ``{"name": one of METHODS, "settings": {...}}``.

    A `LoRAConfigError` for another shape, an unknown name or an invalid setting; the settings are validated by the
    method's constructor (`LoraConfig.from_settings` for LoRA).
    """
    if not isinstance(config, Mapping) or set(config) != {"name", "settings"}:
        raise LoRAConfigError(f"a method record is {{'name': ..., 'settings': {{...}}}}, got {config!r}")
    name, settings = config["name"], config["settings"]
    if not isinstance(name, str) or name not in METHODS:
        raise LoRAConfigError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    if not isinstance(settings, Mapping) or not all(isinstance(key, str) for key in settings):
        raise LoRAConfigError(f"the settings of method {name} must be a mapping of names to values, got {settings!r}")
    return METHODS[name](**settings)
