"""The training run's side of the prefix cache: the `perf.cache_prefix` / `perf.cache_dir` options."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from lora_vision.data.base import ImageDataModule
from lora_vision.prefix_cache.serve import CachedFeatureData, serve_prefix_cache
from lora_vision.prefix_cache.split import ModelSplit, PrefixCacheError

# The `perf` keys this package reads; the others are `apply_performance_options`'.
PREFIX_CACHE_KEYS = ("cache_prefix", "cache_dir")


def serve_run_prefix_cache(
    cfg: DictConfig,
    split: ModelSplit,
    datamodule: ImageDataModule,
    fingerprint: str,
    trainer: L.Trainer,
    data: DictConfig | None = None,
) -> tuple[CachedFeatureData, dict[str, Any]]:
    """`serve_prefix_cache` for a run of `lora_vision.train`, after the run-level checks; `data` is the config of
    `datamodule` (default `cfg.data`; a packed run's points share one of their own).

    PrefixCacheError for settings under which the uncached run computes its prefix differently: mixed or double
    precision (the cache holds float32 activations) and torch.compile (it compiles the whole model's forward,
    which the cached run does not call).
    """
    if trainer.precision != "32-true":
        raise PrefixCacheError(
            f"perf.cache_prefix=true with trainer.precision={trainer.precision}: the cache holds float32 "
            "activations, which the uncached run would compute at another precision; set trainer.precision=32 "
            "or perf.cache_prefix=false"
        )
    if cfg.perf.compile:
        raise PrefixCacheError(
            f"perf.cache_prefix=true with perf.compile={cfg.perf.compile}: compile() wraps the whole model's "
            "forward, the cached run calls only its suffix; set perf.compile=false or perf.cache_prefix=false"
        )
    identity = {
        "model": cfg.model.name,
        "model_kwargs": OmegaConf.to_container(cfg.model.kwargs, resolve=True),
        "base_fingerprint": fingerprint,
        "data": OmegaConf.to_container(cfg.data if data is None else data, resolve=True),
    }
    return serve_prefix_cache(
        split, datamodule, identity=identity, cache_dir=cfg.perf.cache_dir, device=trainer.strategy.root_device
    )
