"""Backbones: timm models by name, with pretrained weights from the hub or from a local file."""

from __future__ import annotations

import argparse
import difflib
import logging
import socket
import urllib.parse
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub
import safetensors
import timm
import torch
from torch import nn

from lora_vision.errors import UserError, one_line

log = logging.getLogger(__name__)

# Without network huggingface_hub retries each request five times with back-off, so timm's download fails only
# after about a minute of retry warnings (57 s measured here for vit_tiny_patch16_224); one DNS lookup and TCP
# connect with this timeout tell the same in seconds.
HUB_PROBE_TIMEOUT_S = 3.0

# The first bytes of a zip archive, which `torch.save` has written since torch 1.6.
ZIP_MAGIC = b"PK\x03\x04"
# The first byte of a pickle stream (protocol 2 and later), which `torch.save` wrote before torch 1.6.
PICKLE_PROTOCOL = b"\x80"
# How much of the start of a file in neither format a message quotes: enough to tell an HTML page or a text file.
SHOWN_BYTES = 16


class ModelConfigError(UserError, ValueError):
    """A `model.*` setting is invalid; the message names the key, the bad value and what is valid."""


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights could not be fetched (no network, unknown tag, ...); the message shows the fix."""


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    # Compare against architectures and architecture.tag names, so a typo in either part finds its match.
    candidates = timm.list_models() + timm.list_pretrained()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "list them with timm.list_models('*pattern*')"
    raise ModelConfigError(f"model.name={name!r} is not a timm model; {hint}")


def weights_file_damage(path: Path) -> str | None:
    """Why the weights or checkpoint file `path` is truncated or damaged; None if it reads whole.

    Told before anything is built, so that a copy or download that stopped early, a full disk or an error page saved
    under the file's name is named as such, not met as a traceback from inside timm or Lightning, which load the file
    once afterwards. A safetensors file starts with a header that gives every tensor's byte range, which safetensors
    checks against the file's size. `torch.save` writes a zip archive whose directory sits at its end and which holds
    the CRC-32 of every member: a file cut short lacks the directory, a file with bytes overwritten fails a CRC
    (checking reads the file once, a tenth of a second for 300 MB). A file in torch's format of before 1.6 (a bare
    pickle stream) has neither: it is loaded, as tensors only, to tell.
    """
    if path.suffix == ".safetensors":  # the suffix is what picks timm's reader too
        try:
            with safetensors.safe_open(path, "pt"):
                return None
        except safetensors.SafetensorError as err:
            return one_line(err)
    with path.open("rb") as file:
        start = file.read(SHOWN_BYTES)
    if not start:
        return "the file is empty"
    if start.startswith(ZIP_MAGIC):
        return _zip_damage(path)
    if start.startswith(PICKLE_PROTOCOL):
        return _pickle_damage(path)
    return f"it is neither a torch.save file nor a safetensors file: it begins {start!r}"


def _zip_damage(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            failed = archive.testzip()
    except zipfile.BadZipFile:
        return "the zip directory that torch.save writes at its end is missing or unreadable"
    if failed is not None:
        return f"its part {failed} fails its CRC-32 check: bytes in it changed after it was written"
    return None


def _pickle_damage(path: Path) -> str | None:
    # argparse.Namespace is allowed as timm's loader allows it: old timm training checkpoints record their arguments.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # A stream cut short fails wherever the unpickler or torch's storage reader meets its end (EOFError,
        # IndexError, struct.error, RuntimeError, a name cut short read as an unknown global); this load does nothing
        # but read the file, so whatever it raises is the file's.
        return one_line(err)
    return None


def checked_checkpoint(checkpoint: str | Path) -> Path:
    """The local weights file `checkpoint` (the `model.checkpoint` setting), refused with a `ModelConfigError` that
    says what to do when it is missing, truncated or damaged (`weights_file_damage`)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ModelConfigError(
            f"model.checkpoint={str(checkpoint)!r} does not exist or is not a file; "
            "give a .safetensors or torch (.pth/.bin) state dict of the same architecture"
        )
    damage = weights_file_damage(path)
    if damage is not None:
        raise ModelConfigError(
            f"model.checkpoint={str(checkpoint)!r} is truncated or damaged ({damage}); download or copy the weights "
            "file again"
        )
    return path


def _check_checkpoint_fits(model: nn.Module, checkpoint: str | Path) -> None:
    """Refuse a checkpoint that lacks tensors of the backbone.

    timm loads pretrained weights non-strictly whenever the model is adapted (new head, other img_size), and
    only logs what it could not load, so weights of another architecture would silently leave the backbone at
    random init. Shapes may differ (timm resamples position embeddings); names must all be there.
    """
    provided = timm.models.load_state_dict(str(checkpoint))
    head = model.get_classifier()
    head_keys = {f"{n}.{k}" for n, m in model.named_modules() if m is head for k in m.state_dict()}
    missing = [k for k in model.state_dict() if k not in provided and k not in head_keys]
    if missing:
        raise ModelConfigError(
            f"model.checkpoint={str(checkpoint)!r} does not fit {type(model).__name__} "
            f"({len(missing)} of {len(model.state_dict())} tensors missing, e.g. {', '.join(missing[:4])}); "
            "give weights of the same architecture as model.name"
        )


def build_model(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    kwargs: Mapping[str, Any] | None = None,
    zero_init_head: bool = True,
) -> nn.Module:
    """`timm.create_model(name, pretrained, num_classes, **kwargs)`, with local weights when `checkpoint` is set.

    A checkpoint (safetensors or torch state dict) is loaded through timm's own pretrained path
    (`pretrained_cfg_overlay=dict(file=...)`), so timm still adapts it: a new head for `num_classes`,
    position embeddings resampled for another `img_size`, input-channel changes.

    With `zero_init_head`, a head that pretrained weights do not provide starts at zero. timm's EfficientNet
    heads start uniform in +-1/sqrt(num_classes), which on 1280-d features gives initial logits in the tens
    and a loss of 6-10 that a linear probe spends its whole budget undoing; a zero head starts at log(classes).
    """
    _check_name(name)
    create_kwargs = dict(kwargs or {})
    if checkpoint is not None:
        create_kwargs["pretrained_cfg_overlay"] = {"file": str(checked_checkpoint(checkpoint).resolve())}
        pretrained = True
    try:
        with _hub_cache_only_when_unreachable(name, pretrained and checkpoint is None):
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **create_kwargs)
    except OSError as err:
        # Hub and URL downloads surface as OSError subclasses (LocalEntryNotFoundError, URLError, ...).
        if not pretrained or checkpoint is not None:
            raise
        raise PretrainedWeightsUnavailable(
            f"could not download pretrained weights for {name!r} from {_weights_source(name)} "
            f"({type(err).__name__}: {err}). "
            f"Pass a local file instead: model.checkpoint=/path/to/weights.safetensors, or train from "
            f"scratch with model.pretrained=false."
        ) from err
    if checkpoint is not None:
        _check_checkpoint_fits(model, checkpoint)
    if zero_init_head and pretrained and num_classes != model.pretrained_cfg.get("num_classes"):
        head = model.get_classifier()
        for param in head.parameters():
            nn.init.zeros_(param)
    source = checkpoint if checkpoint is not None else ("timm pretrained" if pretrained else "random init")
    log.info("built %s (%s) with %d classes", name, source, num_classes)
    return model


def _hub_reachable() -> bool:
    endpoint = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


@contextmanager
def _hub_cache_only_when_unreachable(name: str, from_hub: bool) -> Iterator[None]:
    """Hub weights on a machine that cannot reach the hub: read the local cache only, without retries.

    A cached file loads as with HF_HUB_OFFLINE=1; a missing one fails at once, and the caller's message says how
    to pass a local file. Weights from URLs and local files are left alone.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    hub = from_hub and cfg is not None and bool(cfg.hf_hub_id) and not huggingface_hub.constants.HF_HUB_OFFLINE
    if not hub or _hub_reachable():
        yield
        return
    endpoint = huggingface_hub.constants.ENDPOINT
    log.warning("%s is unreachable; %s's weights come from the local cache only", endpoint, name)
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = False


def route_hub_logs_to_root() -> None:
    """Let huggingface_hub's log lines reach the root logger's handlers only.

    The library gives its root logger a stream handler of its own and also propagates to the root logger, so under
    Hydra's logging every hub warning printed twice (and only one copy reached the run's log file).
    """
    library = logging.getLogger("huggingface_hub")
    for handler in [h for h in library.handlers if type(h) is logging.StreamHandler]:
        library.removeHandler(handler)


def _weights_source(name: str) -> str:
    """Where timm fetches `name`'s pretrained weights, for messages: a hub repo (and the local cache) or a URL."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        return f"hf-hub:{cfg.hf_hub_id} (cached under {huggingface_hub.constants.HF_HUB_CACHE})"
    if cfg is not None and cfg.url:
        return f"{cfg.url} (cached under {torch.hub.get_dir()}/checkpoints)"
    return "timm's pretrained config"


def model_label(
    name: str, kwargs: Mapping[str, Any] | None = None, pretrained: bool = True, checkpoint: str | Path | None = None
) -> str:
    """The model as built, for records, reports and exports: `vit_tiny_patch16_224 (depth=2, embed_dim=64;
    random init)`, `vit_base_patch16_224.augreg_in21k (pretrained)`, `resnet50 (weights: ft.safetensors)`.

    The timm name alone says what `timm.create_model(name, pretrained=True)` gives, which is not what ran when the
    weights were random or came from a file, or when create kwargs changed the architecture. A random-init model
    is named without the pretrained tag, which names weights it does not have. `img_size` is left out: it follows
    the input size, which records and reports state on their own.
    """
    changes = ", ".join(f"{key}={value}" for key, value in sorted((kwargs or {}).items()) if key != "img_size")
    if checkpoint is not None:
        weights = f"weights: {Path(checkpoint).name}"
    elif pretrained:
        weights = "pretrained"
    else:
        name, weights = name.split(".", 1)[0], "random init"
    return f"{name} ({changes + '; ' if changes else ''}{weights})"


def check_input_size(model: nn.Module, image_size: int) -> None:
    """Refuse an input size a patch-based model would not see whole.

    timm's ViTs floor the patch grid: a 36 px input to 8 px patches silently drops the last 4 pixel rows and
    columns. A model built for another `img_size` would fail only at the first forward pass, inside training.
    """
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None or getattr(patch_embed, "dynamic_img_pad", False):
        return
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    step = max(patch)
    if any(image_size % p for p in patch):
        lower, upper = image_size // step * step, (image_size // step + 1) * step
        valid = f"{lower} or {upper}" if lower else f"{upper}"
        raise ModelConfigError(
            f"data.image_size={image_size} is not a multiple of the patch size {step} of {type(model).__name__}; "
            f"use a multiple of {step}, e.g. {valid}"
        )
    built = getattr(patch_embed, "img_size", None)
    if built is not None and getattr(patch_embed, "strict_img_size", False) and tuple(built) != (image_size,) * 2:
        raise ModelConfigError(
            f"data.image_size={image_size} does not match the {built[0]}x{built[1]} input the model was built for; "
            "set model.kwargs.img_size=${data.image_size} so both follow data.image_size"
        )


def model_data_config(model: nn.Module, image_size: int, crop_pct: float | None = None) -> dict[str, Any]:
    """The model's timm data config with the input size this run actually uses.

    `timm.data.resolve_model_data_config` reports the pretrained config's input size (224 for a ViT built with
    `img_size=32`), so `input_size` is always replaced by `image_size`; `crop_pct` is replaced when given.
    ModelConfigError if the model cannot take `image_size` (see `check_input_size`).
    """
    check_input_size(model, image_size)
    config = timm.data.resolve_model_data_config(model)
    config["input_size"] = (config["input_size"][0], image_size, image_size)
    if crop_pct is not None:
        config["crop_pct"] = crop_pct
    return config
