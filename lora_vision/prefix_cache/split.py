"""Where a prepared model splits into a frozen prefix (cacheable) and a suffix (trained), and whether it may.

The prefix is the stem plus the leading blocks that hold no trainable parameter; it ends right before the block
that holds the lowest adapter (or other trainable parameter). `suffix(prefix(x))` runs exactly the operations of
the model's own forward, in the same order, so it equals `model(x)` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from timm.layers import DropBlock2d, DropPath, PatchDropout
from timm.models import EfficientNet, ResNet, VisionTransformer
from timm.models._manipulate import checkpoint_seq
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from lora_vision.errors import UserError


class PrefixCacheError(UserError, ValueError):
    """Caching the frozen prefix is unsupported or would change the results; the message names the setting."""


@dataclass(frozen=True)
class Layout:
    """How one timm architecture's `forward` runs: stem, a flat list of blocks, then what follows them."""

    model_class: type[nn.Module]
    # Attributes (modules or parameters) the stem uses; any of them trainable leaves nothing to cache.
    stem_parts: tuple[str, ...]
    stem: Callable[[Any, Tensor], Tensor]
    blocks: Callable[[Any], list[nn.Module]]
    head: Callable[[Any, Tensor], Tensor]


# Each mirrors its class's `forward_features` + `forward_head` in timm 1.0 (the no-mask path of the ViT); the
# split tests check the composition against the model's own forward with torch.equal.
LAYOUTS = (
    Layout(
        VisionTransformer,
        ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "patch_drop", "norm_pre"),
        stem=lambda m, x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))),
        blocks=lambda m: list(m.blocks),
        head=lambda m, x: m.forward_head(m.norm(x)),
    ),
    # Blocks at the granularity of timm's own checkpointing (flattened stages), finer than `lora.blocks` (stages).
    Layout(
        EfficientNet,
        ("conv_stem", "bn1"),
        stem=lambda m, x: m.bn1(m.conv_stem(x)),
        blocks=lambda m: [block for stage in m.blocks for block in stage],
        head=lambda m, x: m.forward_head(m.bn2(m.conv_head(x))),
    ),
    Layout(
        ResNet,
        ("conv1", "bn1", "act1", "maxpool"),
        stem=lambda m, x: m.maxpool(m.act1(m.bn1(m.conv1(x)))),
        blocks=lambda m: [m.layer1, m.layer2, m.layer3, m.layer4],
        head=lambda m, x: m.forward_head(x),
    ),
)

# Layers that draw random numbers in training mode, by the attribute holding their rate.
STOCHASTIC = ((_DropoutNd, "p"), (DropPath, "drop_prob"), (PatchDropout, "prob"), (DropBlock2d, "drop_prob"))


@dataclass(frozen=True)
class ModelSplit:
    """A model cut before block `depth`: `prefix` runs the stem and blocks[:depth], `suffix` the rest."""

    model: nn.Module
    layout: Layout
    depth: int

    @property
    def blocks(self) -> list[nn.Module]:
        return self.layout.blocks(self.model)

    def prefix_modules(self) -> list[nn.Module]:
        """Every module the prefix runs (stem parts and leading blocks), for the checks and the mode switch."""
        stem = [getattr(self.model, name, None) for name in self.layout.stem_parts]
        return [part for part in stem if isinstance(part, nn.Module)] + self.blocks[: self.depth]

    def prefix(self, images: Tensor) -> Tensor:
        x = self.layout.stem(self.model, images)
        for block in self.blocks[: self.depth]:
            x = block(x)
        return x

    def suffix(self, features: Tensor) -> Tensor:
        blocks = self.blocks[self.depth :]
        # timm's per-block activation checkpointing (perf.grad_checkpointing) holds for the blocks still run.
        if getattr(self.model, "grad_checkpointing", False) and blocks:
            x = checkpoint_seq(blocks, features)
        else:
            x = features
            for block in blocks:
                x = block(x)
        return self.layout.head(self.model, x)


def layout_of(model: nn.Module) -> Layout:
    """The layout of `model`'s class; PrefixCacheError for a class (or a subclass's own forward) it lacks."""
    for layout in LAYOUTS:
        cls = layout.model_class
        if isinstance(model, cls) and _runs_forward_of(model, cls):
            return layout
    supported = ", ".join(f"timm {layout.model_class.__name__}" for layout in LAYOUTS)
    raise PrefixCacheError(
        f"perf.cache_prefix=true does not support {type(model).__module__}.{type(model).__qualname__}: it splits "
        f"{supported} (with their own forward); set perf.cache_prefix=false"
    )


def _runs_forward_of(model: nn.Module, cls: type[nn.Module]) -> bool:
    # A subclass that overrides these runs something the layout does not mirror.
    methods = ("forward", "forward_features", "forward_head")
    return all(getattr(type(model), name) is getattr(cls, name) for name in methods)


def find_split(model: nn.Module, *, frozen_bn_eval: bool = True) -> ModelSplit:
    """The split of a prepared model (adapters added, backbone frozen) before its lowest trainable block.

    PrefixCacheError when the model is unsupported, when nothing precedes the first trainable parameter, or when
    the prefix would compute something else in training than in eval mode: a random layer with a non-zero rate,
    or BatchNorm that trains with batch statistics (`frozen_bn_eval=False`, see `Classifier`).
    """
    layout = layout_of(model)
    depth = _frozen_depth(model, layout)
    split = ModelSplit(model, layout, depth)
    names = {id(module): name for name, module in model.named_modules()}
    for module in (inner for part in split.prefix_modules() for inner in part.modules()):
        name = names[id(module)]
        for kind, attribute in STOCHASTIC:
            rate = getattr(module, attribute) if isinstance(module, kind) else 0
            if rate:
                raise PrefixCacheError(
                    f"perf.cache_prefix=true: {name} ({type(module).__name__}, {attribute}={rate}) is in the "
                    "frozen prefix and random while training, so cached activations would differ from the "
                    "uncached run's; set its rate to 0 (model.kwargs: drop_rate, drop_path_rate, "
                    "patch_drop_rate, ...) or perf.cache_prefix=false"
                )
        if isinstance(module, _BatchNorm) and not frozen_bn_eval:
            raise PrefixCacheError(
                f"perf.cache_prefix=true with module.frozen_bn_eval=false: {name} in the frozen prefix normalises "
                "with batch statistics while training, the cached (eval-mode) activations with its running "
                "statistics; set module.frozen_bn_eval=true or perf.cache_prefix=false"
            )
    return split


def _frozen_depth(model: nn.Module, layout: Layout) -> int:
    """The number of leading blocks without a trainable parameter; PrefixCacheError when it is 0."""
    stem = [name for name in layout.stem_parts if _trains(getattr(model, name, None))]
    blocks = layout.blocks(model)
    depth = 0 if stem else next((i for i, block in enumerate(blocks) if _trains(block)), len(blocks))
    if depth == 0:
        first = next(name for name, module in model.named_modules() if module is blocks[0])
        where = f"the stem ({', '.join(stem)})" if stem else f"its first block ({first})"
        raise PrefixCacheError(
            f"perf.cache_prefix=true: nothing to cache, {where} of the {type(model).__name__} trains; the prefix "
            "cache needs frozen leading blocks (adapters only in later blocks, e.g. lora.blocks=-4:), or set "
            "perf.cache_prefix=false"
        )
    return depth


def _trains(part: nn.Module | nn.Parameter | None) -> bool:
    if isinstance(part, nn.Parameter):
        return part.requires_grad
    return isinstance(part, nn.Module) and any(p.requires_grad for p in part.parameters())
