"""Merged export: plain timm weights that reproduce the adapted model, loadable without lora_vision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from lora_vision.adapters import weights_fingerprint
from lora_vision.export import MODEL_META, MODEL_TENSORS, export_merged, load_merged, main
from lora_vision.lora import LoRALayer
from lora_vision.methods import LoRA
from tests.helpers import (
    RESNET_KWARGS,
    VIT_KWARGS,
    adapted,
    perturb_trainable,
    randomize_adapters,
    tiny_resnet,
    tiny_vit,
)

VIT = "vit_small_patch16_224"

# Runs in a fresh interpreter that never imports lora_vision: the documented load call must suffice.
PLAIN_TIMM = """
import json, sys
import timm, torch
images = torch.load(sys.argv[1])
for export in sys.argv[2:]:
    model = eval(json.load(open(f"{export}/model.json"))["load"]).eval()
    with torch.no_grad():
        torch.save(model(images), f"{export}/logits.pt")
assert "lora_vision" not in sys.modules
"""


def adapted_vit(targets: list[str], **options) -> nn.Module:
    model = tiny_vit()
    LoRA(rank=4, targets=targets, **options).apply(model)
    perturb_trainable(model)
    return model.eval()


def export_vit(model: nn.Module, directory: Path) -> Path:
    return export_merged(model, directory, model_name=VIT, model_kwargs=VIT_KWARGS, num_classes=10)


def test_plain_timm_in_a_fresh_process_reproduces_the_adapted_model(tmp_path: Path, images: torch.Tensor) -> None:
    # One with a trained head, one with LoRA on the head itself.
    models = {"qv": adapted_vit(["qv"]), "qv+head": adapted_vit(["qv", "classifier"], train_head=False)}
    for name, model in models.items():
        export_vit(model, tmp_path / name)
    torch.save(images, tmp_path / "images.pt")
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_TIMM, str(tmp_path / "images.pt"), *(str(tmp_path / name) for name in models)],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name, model in models.items():
        with torch.no_grad():
            expected = model(images)
        torch.testing.assert_close(torch.load(tmp_path / name / "logits.pt"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: adapted_vit(["all_linear"], dora=True),
        lambda: adapted_vit(["mlp"], init="pissa", rslora=True),
        lambda: adapted_vit(["qv", "classifier"], train_head=False),
    ],
    ids=["all_linear-dora", "mlp-pissa-rslora", "adapted-head"],
)
def test_in_process_load_reproduces_every_variant(make, tmp_path: Path, images: torch.Tensor) -> None:
    model = make()
    export_vit(model, tmp_path)
    plain, meta = load_merged(tmp_path / MODEL_TENSORS)
    assert not any(isinstance(m, LoRALayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model(images), atol=1e-5, rtol=0)
    assert meta["num_classes"] == 10 and meta["model_kwargs"] == VIT_KWARGS


def test_a_resnet_with_conv_adapters_exports_exactly(tmp_path: Path, images: torch.Tensor) -> None:
    model = tiny_resnet()
    LoRA(rank=2, targets=["all_convs"]).apply(model)
    randomize_adapters(model, std=0.02)
    model.eval()
    export_merged(model, tmp_path, model_name="resnet18", model_kwargs=RESNET_KWARGS, num_classes=10)
    plain, _ = load_merged(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model(images), atol=1e-5, rtol=1e-5)


def test_the_class_count_in_the_overlay_is_what_keeps_the_head(tmp_path: Path, images: torch.Tensor) -> None:
    model = adapted_vit(["qv"])
    export_vit(model, tmp_path)
    meta = json.loads((tmp_path / MODEL_META).read_text())
    assert f"pretrained_cfg_overlay=dict(file={str(tmp_path / MODEL_TENSORS)!r}, num_classes=10)" in meta["load"]
    # timm drops the file's classifier when num_classes differs from the pretrained config's (1000 here).
    naive = timm.create_model(
        VIT,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / MODEL_TENSORS)),
        num_classes=10,
        **VIT_KWARGS,
    ).eval()
    with torch.no_grad():
        assert not torch.allclose(naive(images), model(images), atol=1e-3)


def test_export_records_the_data_config_and_leaves_the_model_adapted(tmp_path: Path, images: torch.Tensor) -> None:
    model = adapted_vit(["qv"])
    fingerprint = weights_fingerprint(model)
    with torch.no_grad():
        before = model(images)
    data_config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    export_merged(model, tmp_path, model_name=VIT, model_kwargs=VIT_KWARGS, num_classes=10, data_config=data_config)
    meta = json.loads((tmp_path / MODEL_META).read_text())
    assert meta["data_config"]["input_size"] == [3, 32, 32] and meta["model_name"] == VIT
    assert isinstance(model.blocks[0].attn.qkv, LoRALayer) and weights_fingerprint(model) == fingerprint
    with torch.no_grad():
        assert torch.equal(model(images), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_META, MODEL_TENSORS]


def test_cli_exports_an_adapter(tmp_path: Path, images: torch.Tensor, capsys: pytest.CaptureFixture) -> None:
    model = adapted(tiny_vit, LoRA(rank=4, targets=["qv"]), tmp_path / "adapter", VIT, VIT_KWARGS)
    main([str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    printed = capsys.readouterr().out
    assert "timm.create_model(" in printed
    # Named as built: four blocks of 64 dimensions at random init, not the pretrained ViT-S the timm name suggests.
    built = "vit_small_patch16_224 (depth=4, embed_dim=64, num_heads=2, patch_size=8; random init)"
    assert f"exported {built} to " in printed
    plain, meta = load_merged(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model(images), atol=1e-5, rtol=0)
    adapter_meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["source"]["base_fingerprint"] == adapter_meta["base_fingerprint"]
    assert meta["source"]["model_label"] == adapter_meta["model_label"] == built


@pytest.mark.parametrize(
    ("source", "message"),
    [("missing", "does not exist"), ("empty", "is not an adapter: expected a directory with adapter.safetensors")],
)
def test_cli_refuses_a_source_without_adapter(
    source: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / source), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
