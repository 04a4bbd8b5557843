"""LoRA layers: a frozen base layer and its low-rank adapters, by name.

    y = base(x) + sum over the active adapters a of update_a(x)          (lora_vision.lora.adapter)

A layer holds any number of adapters (`adapters`, by name), each with its own rank, alpha, variants, dropout and,
on a fused qkv Linear, slots. One adapter, `default` unless named otherwise, is what `apply_lora` adds; the same
layer takes more with `add_adapter`. Which ones apply is the active set (`set_active`), for every sample of a
batch, or a routing (`lora_vision.lora.routing.route`) that sends each sample through its own adapter: samples are
grouped by adapter, so a mixed batch costs the base layer's pass plus each adapter's own work on its samples. An
adapter that does not target a layer is absent from it, and its samples get the base output there.

The layer keeps the wrapped module as `self.base`, so an adapter's `merge()` can fold its update into
`base.weight` and inference then costs exactly what the base layer costs; `unmerge()` takes it out again. One
adapter at a time may be merged, and only while it is the one active adapter.

State-dict keys: the tensors of the adapter named `default` keep the names a single-adapter layer has always had
(`<layer>.lora_A`, `<layer>.lora_magnitude`, ...), so every adapter file and checkpoint written before layers held
several adapters loads unchanged; another adapter's are `<layer>.adapters.<name>.lora_A`.

With one adapter the attributes a single-adapter layer had (`lora_A`, `rank`, `scale`, `low_rank_update()`, ...)
read that adapter; with several, name one: `layer.adapters["woof"]`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lora_vision.lora.adapter import Conv2dAdapter, LinearAdapter, LoraAdapter
from lora_vision.lora.errors import LoRAConfigError

DEFAULT_ADAPTER = "default"
ADAPTERS = "adapters"
# Attributes a layer with one adapter reads from it, as a single-adapter layer had them.
SINGLE_ADAPTER_ATTRIBUTES = frozenset(
    {
        "lora_A",
        "lora_B",
        "lora_magnitude",
        "pissa_A0",
        "pissa_B0",
        "rank",
        "alpha",
        "scale",
        "variants",
        "variant",
        "dropout",
        "slots",
        "num_slots",
        "slot_index",
        "rank_dims",
        "slot_names",
        "parts",
        "factors",
        "low_rank_update",
        "set_low_rank_update",
        "delta_weight",
        "base_matrix",
        "adapter_forward",
        "_slot_factors",
        "_native_factors",
        "_base_slots",
        "_base_slots_of",
        "_slots_to_weight",
        "_slot_delta",
    }
)


class AdapterNameError(LoRAConfigError, KeyError):
    """An adapter name a layer or model does not hold; the message lists the ones it does."""

    def __str__(self) -> str:
        # KeyError would print the message in quotes.
        return str(self.args[0])


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise LoRAConfigError(f"adapter name {name!r}: give a non-empty name without dots")


class LoRALayer(nn.Module):
    """A frozen base layer with named low-rank adapters: adding, removing, activating, routing and merging them.

    Subclasses name the adapter class that fits their base (`adapter_class`).
    """

    adapter_class: type[LoraAdapter]

    def __init__(self, base: nn.Module, *args: Any, adapter_name: str = DEFAULT_ADAPTER, **kwargs: Any) -> None:
        """The layer with its first adapter `adapter_name` (the adapter class's arguments after the base), or,
        given no arguments, with none yet (`add_adapter`, `attach_adapter`)."""
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        # Set by lora_vision.lora.routing.route for the duration of a forward pass: each sample's adapter.
        self.routing: Any = None
        if args or kwargs:
            self.add_adapter(adapter_name, *args, **kwargs)
        # Swapping a layer into a model in eval mode must not put that one layer into train mode.
        self.train(base.training)
        self._register_state_dict_hook(_default_adapter_keys_out)
        self.register_load_state_dict_pre_hook(_default_adapter_keys_in)

    # Adapters by name ---------------------------------------------------------------------------------------

    def add_adapter(self, name: str, *args: Any, **kwargs: Any) -> LoraAdapter:
        """A new adapter `name` on this layer (the adapter class's arguments after the base); it joins the active set.

        An adapter starts as an exact no-op (B = 0, or PiSSA's B A - B0 A0 = 0), so adding one changes nothing.
        """
        _check_name(name)
        if name in self.adapters:
            raise LoRAConfigError(f"this layer already holds an adapter named {name!r}; remove it or pick another")
        if self.merged:
            raise RuntimeError("unmerge() before adding an adapter to a layer with a merged one")
        adapter = self.adapter_class(self.base, *args, **kwargs)
        self.adapters[name] = adapter
        self.active = (*self.active, name)
        return adapter

    def attach_adapter(self, name: str, adapter: LoraAdapter) -> None:
        """Hold `adapter`, built on a copy of this layer's base with the same weights, as adapter `name` of this
        layer: from now on it computes against this layer's base. It joins the active set."""
        _check_name(name)
        if name in self.adapters:
            raise LoRAConfigError(f"this layer already holds an adapter named {name!r}; remove it or pick another")
        if not isinstance(adapter, self.adapter_class) or adapter.base.weight.shape != self.base.weight.shape:
            raise LoRAConfigError(f"a {type(adapter).__name__} does not fit this layer's {type(self.base).__name__}")
        if self.merged:
            raise RuntimeError("unmerge() before adding an adapter to a layer with a merged one")
        object.__setattr__(adapter, "base", self.base)
        self.adapters[name] = adapter
        self.active = (*self.active, name)

    def remove_adapter(self, name: str) -> None:
        adapter = self.adapter(name)
        if adapter.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge() before removing it")
        del self.adapters[name]
        self.active = tuple(a for a in self.active if a != name)

    def adapter(self, name: str) -> LoraAdapter:
        if name not in self.adapters:
            raise AdapterNameError(f"no adapter {name!r} on this layer; it holds {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]

    def set_active(self, names: Iterable[str]) -> None:
        """Apply the adapters `names` (those this layer holds) to every sample; the others are kept but skipped."""
        wanted = tuple(dict.fromkeys(names))
        if self.merged and set(wanted) != {name for name, a in self.adapters.items() if a.merged}:
            raise RuntimeError("an adapter is merged into the base weight; unmerge() before changing the active set")
        self.active = tuple(name for name in wanted if name in self.adapters)

    def _single(self) -> LoraAdapter:
        """The layer's one adapter, for the attributes of a single-adapter layer."""
        if len(self.adapters) != 1:
            raise AttributeError(
                f"this layer holds the adapters {', '.join(self.adapters) or 'none'}; name one: layer.adapters[name]"
            )
        return next(iter(self.adapters.values()))

    def __getattr__(self, name: str) -> Any:
        if name in SINGLE_ADAPTER_ATTRIBUTES:
            return getattr(self._single(), name)
        return super().__getattr__(name)

    # Forward and merging ------------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return any(adapter.merged for adapter in self.adapters.values())

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def _through(self, name: str | None, x: Tensor) -> Tensor:
        """`x` through adapter `name` alone, or through the base layer when it holds no such adapter."""
        if name in self.adapters:
            return self.adapters[name].forward_with_base(x)
        return self.base(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.routing is not None:
            return self.routing.apply(x, self._through)
        active = [self.adapters[name] for name in self.active]
        if self.merged:
            trains = self.training and torch.is_grad_enabled()
            if trains and any(p.requires_grad for a in active for p in a.parameters()):
                # A merged adapter is invisible to autograd: training on would silently leave A and B untouched.
                raise RuntimeError("LoRA weights are merged into the base layer; call unmerge() before training")
            return self.base(x)
        if len(active) == 1:
            return active[0].forward_with_base(x)
        rescaling = [name for name in self.active if not self.adapters[name].additive]
        if rescaling:
            raise LoRAConfigError(
                f"adapter {rescaling[0]!r} ({self.adapters[rescaling[0]].variant}) rescales the layer's whole output, "
                f"so it cannot be summed with adapters {', '.join(n for n in self.active if n != rescaling[0])}: "
                "activate one, or route each sample to its own"
            )
        out = self.base(x)
        for adapter in active:
            out = adapter.adapter_forward(x, out)
        return out

    def merge(self) -> None:
        """Fold the update of the active adapter into the base weight (none active: nothing to fold)."""
        if len(self.active) > 1:
            raise LoRAConfigError(
                f"adapters {', '.join(self.active)} are active: a merge folds one adapter into the weight every "
                "sample goes through; activate one (set_active_adapters) first"
            )
        for name in self.active:
            self.adapters[name].merge()

    def unmerge(self) -> None:
        """Take every merged update out of the base weight again (to float rounding)."""
        for adapter in self.adapters.values():
            adapter.unmerge()

    @property
    def adapter_parameters(self) -> int:
        return sum(adapter.adapter_parameters for adapter in self.adapters.values())

    @property
    def base_parameters(self) -> int:
        return sum(p.numel() for p in self.base.parameters())


def state_dict_key(name: str) -> str:
    """The state-dict key of a parameter or buffer name (`model.named_parameters()`): the default adapter's
    tensors are saved under a single-adapter layer's names, without `adapters.default.`."""
    inner = f".{ADAPTERS}.{DEFAULT_ADAPTER}."
    return name.replace(inner, ".") if not name.startswith(inner[1:]) else name[len(inner) - 1 :]


def _default_adapter_keys_out(module: LoRALayer, state: dict[str, Tensor], prefix: str, metadata: Any) -> None:
    inner = f"{prefix}{ADAPTERS}.{DEFAULT_ADAPTER}."
    for key in [k for k in state if k.startswith(inner)]:
        state[prefix + key[len(inner) :]] = state.pop(key)


def _default_adapter_keys_in(module: LoRALayer, state: dict[str, Tensor], prefix: str, *args: Any) -> None:
    # Every key of this layer that is neither its base's nor a named adapter's is the default adapter's.
    if DEFAULT_ADAPTER not in module.adapters:
        return
    own = (f"{prefix}base.", f"{prefix}{ADAPTERS}.")
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(own)]:
        state[f"{prefix}{ADAPTERS}.{DEFAULT_ADAPTER}.{key[len(prefix) :]}"] = state.pop(key)


class LoRALinear(LoRALayer):
    """LoRA on an `nn.Linear`; its adapters may each adapt all of it or some q/k/v slots (`LinearAdapter`).

    `LoRALinear(base, rank, alpha, dropout, num_slots, slots, **variants)` creates the layer with its first
    adapter, as a single-adapter layer always was.
    """

    adapter_class = LinearAdapter

    @staticmethod
    def max_rank(base: nn.Linear, num_slots: int = 1) -> int:
        return LinearAdapter.max_rank(base, num_slots)


class LoRAConv2d(LoRALayer):
    """LoRA on an `nn.Conv2d` or any subclass, grouped and depthwise included (`Conv2dAdapter`)."""

    adapter_class = Conv2dAdapter

    @staticmethod
    def max_rank(base: nn.Conv2d) -> int:
        return Conv2dAdapter.max_rank(base)
