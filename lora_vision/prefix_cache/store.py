"""Prefix activations on disk: one directory per cache key, written once and shared by every run that needs it.

Layout: ``<root>/<key>/{train,val,test}.safetensors`` (tensors ``features``, float32, and ``labels``, int64) plus
``key.json`` (what the key hashes, for people). The directory appears complete or not at all: it is written under a
temporary name and renamed. Jobs computing the same key at the same time take turns on ``<root>/<key>.lock``; the
later ones find the directory and load it. A job killed while writing leaves a ``.<key>.*`` temporary directory,
which is safe to delete once no job writes that key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
from filelock import FileLock
from torch import Tensor

log = logging.getLogger(__name__)

# Bump when the directory layout or the meaning of a key part changes, so old entries are never read.
FORMAT_VERSION = 1
KEY_FILE = "key.json"


def cache_key(parts: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of `parts` as canonical JSON (sorted keys); values that are not JSON are hashed as text."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class FeatureStore:
    """The cache entry of one key under `root`: whether it exists, how to fill it, how to read a split."""

    def __init__(self, root: str | Path, parts: Mapping[str, Any]) -> None:
        self.root = Path(root).expanduser()
        self.parts = dict(parts)
        self.key = cache_key(parts)
        self.directory = self.root / self.key

    def ensure(self, splits: Iterable[str], compute: Callable[[str], tuple[Tensor, Tensor]]) -> bool:
        """Make the entry exist, computing each split with `compute(split) -> (features, labels)` if it does not.

        Returns True for a hit (the entry existed, or another job wrote it while this one waited for the lock).
        """
        if self.directory.is_dir():
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / f"{self.key}.lock"):
            if self.directory.is_dir():
                return True
            log.info("computing the prefix activations into %s", self.directory)
            self._write(splits, compute)
        return False

    def _write(self, splits: Iterable[str], compute: Callable[[str], tuple[Tensor, Tensor]]) -> None:
        staging = Path(tempfile.mkdtemp(prefix=f".{self.key}.", dir=self.root))
        try:
            for split in splits:
                features, labels = compute(split)
                # safetensors rather than torch.save: a cache directory shared between jobs (and users) is then
                # read without unpickling anything, and the header names shapes and dtypes without loading.
                safetensors.torch.save_file(
                    {"features": features.contiguous(), "labels": labels}, staging / f"{split}.safetensors"
                )
            (staging / KEY_FILE).write_text(json.dumps(self.parts, indent=2, sort_keys=True, default=str) + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            os.rename(staging, self.directory)
        except OSError:
            # Where file locks do not work (some network filesystems) two writers can race: the first rename wins
            # and the loser drops its copy of the same data.
            shutil.rmtree(staging, ignore_errors=True)
            if not self.directory.is_dir():
                raise

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        """(features, labels) of `split`."""
        tensors = safetensors.torch.load_file(self.directory / f"{split}.safetensors")
        return tensors["features"], tensors["labels"]
