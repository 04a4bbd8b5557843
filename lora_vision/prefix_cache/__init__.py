"""Cache the frozen prefix's activations (`perf.cache_prefix`): compute them once, train only the suffix.

With adapters only in the last blocks and no augmentation (the VTAB-1k protocol), every epoch of every run of a
sweep pushes the same images through the same frozen leading blocks. `split` finds where the frozen prefix ends
and refuses settings under which caching would change results; `store` keeps the activations on disk under a key
of everything they depend on; `serve` computes them on a miss and trains a suffix-only Classifier on them; `run`
wires the options into `lora_vision.train`.
"""

from lora_vision.prefix_cache.run import PREFIX_CACHE_KEYS, serve_run_prefix_cache
from lora_vision.prefix_cache.serve import CachedFeatureData, SuffixClassifier, serve_prefix_cache
from lora_vision.prefix_cache.split import ModelSplit, PrefixCacheError, find_split
from lora_vision.prefix_cache.store import FeatureStore, cache_key

__all__ = [
    "PREFIX_CACHE_KEYS",
    "CachedFeatureData",
    "FeatureStore",
    "ModelSplit",
    "PrefixCacheError",
    "SuffixClassifier",
    "cache_key",
    "find_split",
    "serve_prefix_cache",
    "serve_run_prefix_cache",
]
