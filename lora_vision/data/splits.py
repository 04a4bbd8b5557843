"""Seeded, class-aware index selection (validation split, balanced subset) and the dataset view using it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lora_vision.data.errors import DataOptionError


class TransformedSubset(Dataset):
    """``dataset`` restricted to ``indices`` (all items when None), with ``transform`` applied to each image.

    torch's ``Subset`` cannot give the training and validation parts of one dataset different transforms,
    which carving a validation split out of the training set needs.
    """

    def __init__(self, dataset: Any, indices: Sequence[int] | None, transform: Callable[[Any], Any] | None) -> None:
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.dataset[self.indices[index]]
        return (image if self.transform is None else self.transform(image)), target

    @property
    def targets(self) -> list[int]:
        """The label of every item, in order, without loading images."""
        return [self.dataset.targets[i] for i in self.indices]


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(len(targets))`` into (rest, held_out), holding out ``round(fraction * n)`` of each class.

    Stratified so small datasets keep every class in both parts; seeded so the split is reproducible.
    Both lists are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise DataOptionError(f"a held-out fraction must be in (0, 1), got {fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    rest: list[int] = []
    held_out: list[int] = []
    for members in _by_class(targets, range(len(targets))).values():
        shuffled = _shuffled(members, generator)
        n_held = round(fraction * len(members))
        held_out += shuffled[:n_held]
        rest += shuffled[n_held:]
    if not held_out or not rest:
        raise DataOptionError(
            f"val_fraction={fraction} of {len(targets)} training images leaves an empty "
            f"{'validation' if not held_out else 'training'} split; choose a value in (0, 1) that does not"
        )
    return sorted(rest), sorted(held_out)


def balanced_subset(
    targets: Sequence[int], size: int, seed: int, among: Sequence[int] | None = None, *, name: str = "train_subset"
) -> list[int]:
    """Pick ``size`` indices (from ``among``, default all) spread as evenly as possible over the classes.

    Each class gets ``size // n_classes`` images; the remainder goes one each to seeded-randomly chosen
    classes, so no class is systematically favoured. Sorted result; errors name the option ``name``.
    """
    candidates = range(len(targets)) if among is None else among
    by_class = _by_class(targets, candidates)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= len(candidates):
        raise DataOptionError(f"{name} must be an integer in [1, {len(candidates)}] (images available), got {size!r}")
    generator = torch.Generator().manual_seed(seed)
    per_class, remainder = divmod(size, len(by_class))
    lucky = set(torch.randperm(len(by_class), generator=generator)[:remainder].tolist())
    chosen: list[int] = []
    for rank, (label, members) in enumerate(by_class.items()):
        quota = per_class + (rank in lucky)
        if quota > len(members):
            largest = len(by_class) * min(map(len, by_class.values()))
            raise DataOptionError(
                f"{name}={size} needs {quota} images of class {label} but only {len(members)} are "
                f"available; every class fits up to {name}={largest}"
            )
        chosen += _shuffled(members, generator)[:quota]
    return sorted(chosen)


def _by_class(targets: Sequence[int], indices: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index in indices:
        groups.setdefault(int(targets[index]), []).append(index)
    return dict(sorted(groups.items()))


def _shuffled(items: list[int], generator: torch.Generator) -> list[int]:
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
