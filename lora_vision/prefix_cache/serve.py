"""Training on cached prefix activations: compute them once per key, then feed them to a suffix-only Classifier.

The cached run keeps everything a run leaves behind as it is without the cache: `SuffixClassifier.model` is the
whole timm model (so checkpoints, adapter files, exports and results.json are unchanged), and the feature loaders
use the image loaders' sampler and generator, so batches come in the same order. The activations are computed in
unshuffled batches of the loaders' size; kernels whose per-image result depends on the batch it shares would break
bit-exactness (seen on the CPU for batches of one image only: EfficientNet convolutions then differ by ~2e-5).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lora_vision.data.base import ImageDataModule
from lora_vision.data.resumable import ResumableDataLoader
from lora_vision.module import Classifier
from lora_vision.prefix_cache.split import ModelSplit, PrefixCacheError, find_split
from lora_vision.prefix_cache.store import FeatureStore

SPLITS = ("train", "val", "test")
# Datamodule options that change how images are batched and loaded, not what the prefix computes from them.
LOADER_OPTIONS = frozenset({"batch_size", "num_workers", "pin_memory", "persistent_workers"})


class SuffixClassifier(Classifier):
    """A Classifier fed prefix activations: its forward runs only the suffix of `model` (see `find_split`).

    `model` is the whole prepared timm model, so the state dict, checkpoints and adapter files are a Classifier's.
    """

    @cached_property
    def model_split(self) -> ModelSplit:
        return find_split(self.model, frozen_bn_eval=self.hparams.frozen_bn_eval)

    def forward(self, features: Tensor) -> Tensor:
        return self.model_split.suffix(features)


class CachedFeatureData(L.LightningDataModule):
    """The train/val/test loaders of `source`, serving (prefix activations, label) from `store` instead of images."""

    def __init__(self, store: FeatureStore, source: ImageDataModule) -> None:
        super().__init__()
        self.store = store
        self.source = source

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def batch_transform(self, features: Tensor, *, training: bool) -> Tensor:
        """Nothing to do: the activations were computed from images after the source's own batch step."""
        return features

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader:
        source = self.source
        # The same sampler and seeded generator as `ImageDataModule`'s loaders. The generator also draws a worker
        # seed whenever an iterator starts, once per epoch, or only once for persistent workers; one persistent
        # worker keeps that pattern, and so the uncached run's order of batches.
        persistent = shuffle and source.persistent_workers and source.num_workers > 0
        # Resumable mid-epoch like the image loaders it stands in for (lora_vision.data.resumable).
        return (ResumableDataLoader if shuffle else DataLoader)(
            TensorDataset(*self.store.load(split)),
            batch_size=source.batch_size,
            shuffle=shuffle,
            num_workers=int(persistent),
            pin_memory=source.pin_memory and torch.cuda.is_available(),
            persistent_workers=persistent,
            generator=torch.Generator().manual_seed(source.seed),
        )


def serve_prefix_cache(
    split: ModelSplit,
    datamodule: ImageDataModule,
    *,
    identity: Mapping[str, Any],
    cache_dir: str | Path,
    device: torch.device,
) -> tuple[CachedFeatureData, dict[str, Any]]:
    """The datamodule to fit and test a module that runs `split.suffix` with, and the run record's `prefix_cache`
    entry.

    identity: what the run's model and data are beyond what the objects tell (model name, create kwargs, base
        weights fingerprint; the data options, under "data"); part of the cache key.
    Computes the activations of every split on `device` on a miss. PrefixCacheError when caching would change the
    results (augmented training data, a random or batch-statistics layer in the prefix) or finds nothing to cache.
    """
    if datamodule.train_augment is not False:
        raise PrefixCacheError(
            f"perf.cache_prefix=true with data.train_augment={datamodule.train_augment!r}: augmented images differ "
            "every epoch, their activations cannot be cached; set data.train_augment=false or perf.cache_prefix=false"
        )
    started = time.perf_counter()
    datamodule.prepare_data()
    store = FeatureStore(cache_dir, key_parts(split, datamodule, identity, device))
    hit = store.ensure(SPLITS, lambda name: prefix_activations(split, datamodule, name, device))
    record = {"hit": hit, "depth": split.depth, "seconds": time.perf_counter() - started, "key": store.key}
    return CachedFeatureData(store, datamodule), record


def key_parts(
    split: ModelSplit, datamodule: ImageDataModule, identity: Mapping[str, Any], device: torch.device
) -> dict[str, Any]:
    """Everything the prefix activations depend on; `FeatureStore` hashes it into the cache key."""
    data = dict(identity.get("data", {}))
    return {
        **{key: value for key, value in identity.items() if key != "data"},
        "model_class": f"{type(split.model).__module__}.{type(split.model).__qualname__}",
        "depth": split.depth,
        "data": {
            "datamodule": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "options": {key: value for key, value in data.items() if key not in LOADER_OPTIONS},
            "data_config": datamodule.resolved_data_config,
            "splits": {name: split_identity(datamodule, name) for name in SPLITS},
        },
        "numerics": {
            "dtype": "float32",
            "torch": torch.__version__,
            "timm": timm.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "channels_last": any(_is_channels_last(p) for m in split.prefix_modules() for p in m.parameters()),
        },
    }


def split_identity(datamodule: ImageDataModule, split: str) -> dict[str, Any]:
    """Which items (indices into the source, and their labels) and which per-image transform a split has."""
    dataset = datamodule.dataset(split)
    items = json.dumps([dataset.indices, [int(t) for t in dataset.targets]]).encode()
    return {"size": len(dataset), "items": hashlib.sha256(items).hexdigest(), "transform": repr(dataset.transform)}


def _is_channels_last(param: Tensor) -> bool:
    return param.dim() == 4 and not param.is_contiguous() and param.is_contiguous(memory_format=torch.channels_last)


def prefix_activations(
    split: ModelSplit, datamodule: ImageDataModule, name: str, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(float32 prefix activations on the CPU, labels) of every item of split `name`, in order.

    Images are batched and transformed as the datamodule's own loaders do (its batch step included); the prefix
    runs on `device` (the model moves there, as Lightning would move it), in eval mode, without autograd.
    """
    dataset = datamodule.dataset(name)
    loader = DataLoader(
        dataset,
        batch_size=datamodule.batch_size,
        num_workers=datamodule.num_workers,
        # A generator of its own: the iterator draws a seed from it, which would otherwise come from (and shift)
        # the global RNG, so that a miss would train differently from a hit.
        generator=torch.Generator(),
    )
    split.model.to(device)
    labels = torch.empty(len(dataset), dtype=torch.int64)
    features: Tensor | None = None
    start = 0
    with eval_mode(split.prefix_modules()), torch.no_grad():
        for images, targets in loader:
            batch = split.prefix(datamodule.batch_transform(images.to(device), training=name == "train"))
            if features is None:
                # Filled in place: concatenating batches would need twice the memory of the split's activations.
                features = torch.empty((len(dataset), *batch.shape[1:]), dtype=torch.float32)
            features[start : start + len(batch)] = batch
            labels[start : start + len(batch)] = torch.as_tensor(targets)
            start += len(batch)
    return features, labels


@contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put `modules` in eval mode, then give every submodule back the mode it had."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
