"""Helpers shared by the test modules: tiny timm models, composed run configs, saved adapters, training subprocesses.

Fixtures live in conftest.py; everything a test module imports lives here, so no test module imports another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lora_vision.adapters import save_adapter, weights_fingerprint
from lora_vision.cli import canonical_overrides
from lora_vision.data import VTAB1K_TASK_NAMES
from lora_vision.lora import LoraAdapter, LoRALinear

CONF = Path(__file__).resolve().parents[1] / "conf"

# Real data and weights may sit beside the checkout; tests that use them skip when they are absent.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EFFNET_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"

TINY_VIT = dict(depth=4, embed_dim=64, num_heads=2, img_size=32, patch_size=8, num_classes=10)


def tiny_vit(**overrides) -> nn.Module:
    return timm.create_model("vit_small_patch16_224", pretrained=False, **{**TINY_VIT, **overrides}).eval()


def tiny_resnet(name: str = "resnet18", **kwargs) -> nn.Module:
    # timm zero-initialises each residual branch's last BN; that would hide any adapter inside the branch.
    return timm.create_model(name, pretrained=False, num_classes=10, zero_init_last=False, **kwargs).eval()


def randomize_adapters(model: nn.Module, std: float = 0.1) -> None:
    """Give every adapter non-zero A and B, so the update is visible in the outputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@contextmanager
def composed(*overrides: str, output_dir: str | Path = "unused-output-dir") -> Iterator[DictConfig]:
    """The run config for `overrides`, as `python -m lora_vision.train` would compose it.

    The Hydra node is registered as the current HydraConfig (so `${hydra:...}` interpolations resolve) and then
    dropped, as `@hydra.main` does; `paths.output_dir` points at `output_dir`.
    """
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = canonical_overrides([*overrides, f"paths.output_dir={output_dir}"])
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with_hydra = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        del cfg.hydra
        OmegaConf.set_struct(cfg, True)
        yield cfg
        # Run and sweep directories must resolve too.
        OmegaConf.to_container(with_hydra.hydra.run, resolve=True)
        OmegaConf.select(with_hydra, "hydra.sweep.dir")


VIT_KWARGS = {k: v for k, v in TINY_VIT.items() if k != "num_classes"}
RESNET_KWARGS = {"zero_init_last": False}


def perturb_trainable(model: nn.Module) -> None:
    """Move every trainable tensor and the running statistics away from their initial values, as training would."""
    randomize_adapters(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        for module in model.modules():
            if isinstance(module, _BatchNorm) and any(p.requires_grad for p in module.parameters()):
                module.running_mean.add_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)


def adapted(make: Callable[[], nn.Module], method: object, path: Path, name: str, kwargs: dict) -> nn.Module:
    """A model built by `make` from seed 0, with `method` applied, perturbed and saved as an adapter at `path`."""
    torch.manual_seed(0)
    model = make()
    fingerprint = weights_fingerprint(model)
    method.apply(model)
    perturb_trainable(model)
    save_adapter(
        model,
        path,
        model_name=name,
        model_kwargs=kwargs,
        num_classes=10,
        method_config=method.config(),
        base_fingerprint=fingerprint,
        base_source={"pretrained": False, "checkpoint": None, "seed": 0},
    )
    return model.eval()


# How adapter.json recorded each method before format version 2: a Hydra `_target_` record with the settings.
VERSION_1_TARGETS = {
    "lora": "lora_vision.methods.LoRA",
    "linear_probe": "lora_vision.methods.LinearProbe",
    "bitfit": "lora_vision.methods.BitFit",
    "full": "lora_vision.methods.FullFineTune",
}


def rewrite_record(file: Path, **entries: object) -> dict:
    """Replace top-level entries of the JSON record `file` (an adapter.json, model.json, ...); return the record."""
    record = {**json.loads(file.read_text()), **entries}
    file.write_text(json.dumps(record, indent=2))
    return record


def as_version_1(file: Path) -> dict:
    """Rewrite the adapter record `file` as lora_vision wrote it in format version 1; return the record."""
    method = json.loads(file.read_text())["method"]
    old_method = {"_target_": VERSION_1_TARGETS[method["name"]], **method["settings"]}
    return rewrite_record(file, format_version=1, method=old_method)


# One short epoch on a quarter of the smoke data: the sweep machinery is under test, not the training.
FAST = ("+exp=smoke", "trainer.max_epochs=1", "data.num_samples=64", "data.num_test_samples=32")


def launch(
    out: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300, module: str = "lora_vision.train"
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (the training command unless `module` names another) run from `out`, offline, with
    W&B files kept in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    offline = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(out)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=out,
        env={**os.environ, **offline, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def multirun(sweep_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return launch(sweep_dir.parent, "-m", *FAST, *overrides, f"hydra.sweep.dir={sweep_dir}", timeout=timeout)


def records(sweep_dir: Path) -> dict[str, dict]:
    """results.json of every job, by job directory name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))}


# Images per list of the miniature VTAB-1k layout; train800val200.txt lists the train800 and val200 images.
MINI_VTAB1K_IMAGES = {"train800": 4, "val200": 2, "test": 4}


def make_vtab1k_layout(root: Path) -> Path:
    """A miniature of the released VTAB-1k layout in `root`: for each of the 19 tasks a few 12 px JPEGs under
    images/<list>/ and the four list files, labels alternating 0 and 1."""
    generator = torch.Generator().manual_seed(0)
    for task in VTAB1K_TASK_NAMES:
        lines: dict[str, list[str]] = {}
        for name, count in MINI_VTAB1K_IMAGES.items():
            folder = root / task / "images" / name
            folder.mkdir(parents=True)
            lines[name] = []
            for index in range(count):
                pixels = torch.randint(0, 256, (12, 12, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{index:06d}.jpg")
                lines[name].append(f"images/{name}/{index:06d}.jpg {index % 2}")
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for name, entries in lines.items():
            (root / task / f"{name}.txt").write_text("\n".join(entries) + "\n")
    return root


def composed_forward(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's function built from plain torch ops (`LoraAdapter.forward_with_base` of its one adapter), the
    reference for the fused node."""
    return LoraAdapter.forward_with_base(layer._single(), x)


class StopAtStep(L.Callback):
    """Stops training once `step` optimizer steps are done, where Lightning stops on SIGTERM (SLURM pre-emption):
    before the next batch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise SIGTERMException
