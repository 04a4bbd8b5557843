"""The README's example of serving mixed batches, run as written against tiny adapters at the paths it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

from lora_vision.adapters import load_adapted_model
from lora_vision.export import main as export_main
from lora_vision.methods import LoRA
from tests.helpers import TINY_VIT, VIT_KWARGS, adapted, tiny_vit

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### Several adapters on one model"


def readme_example(containing: str) -> str:
    """The Python block of the README's section on several adapters that contains `containing`."""
    text = README.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ")]
    return next(block for block in re.findall(r"```python\n(.*?)```", section, re.S) if containing in block)


def test_the_readme_serving_example_gives_each_request_its_own_adapter_s_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    adapted(tiny_vit, LoRA(rank=4, targets=["qv"]), Path("runs/woof/adapter"), "vit_small_patch16_224", VIT_KWARGS)
    adapted(tiny_vit, LoRA(rank=2, targets=["mlp"], dora=True), Path("cifar"), "vit_small_patch16_224", VIT_KWARGS)
    export_main(["cifar", "--format", "peft", "--out", "peft_cifar"])
    create = timm.create_model

    def tiny_base(name: str, **kwargs: object) -> torch.nn.Module:
        """The example's base, shrunk: the tiny ViT the adapters were trained on (seed 0, as `adapted` built it)."""
        torch.manual_seed(0)
        return create(name, **{**kwargs, **TINY_VIT, "pretrained": False})

    monkeypatch.setattr(timm, "create_model", tiny_base)
    example: dict[str, object] = {}
    exec(compile(readme_example("def serve("), str(README), "exec"), example)
    monkeypatch.undo()
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names = ["woof", "cifar", "cifar", "woof", "cifar"]
    logits = example["serve"](list(zip(names, images, strict=True)))
    for name, path in (("woof", tmp_path / "runs/woof/adapter"), ("cifar", tmp_path / "peft_cifar")):
        alone, _ = load_adapted_model(path)
        rows = [i for i, routed_to in enumerate(names) if routed_to == name]
        with torch.no_grad():
            torch.testing.assert_close(logits[rows], alone(images[rows]), atol=1e-6, rtol=1e-6)
