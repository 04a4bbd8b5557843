"""The timm model factory: names, local checkpoints, download failures and the input-size trap."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from lora_vision import models
from lora_vision.models import ModelConfigError, PretrainedWeightsUnavailable, build_model, model_data_config

TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32, "patch_size": 8}


def test_builds_timm_model_with_kwargs_and_head() -> None:
    model = build_model("vit_tiny_patch16_224", num_classes=7, pretrained=False, kwargs=TINY_VIT)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ModelConfigError) as err:
        build_model("resnet5O", num_classes=10, pretrained=False)
    assert "model.name='resnet5O'" in str(err.value) and "resnet50" in str(err.value)


def test_local_checkpoint_is_loaded_with_a_new_head(tmp_path: Path) -> None:
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, **TINY_VIT)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model("vit_tiny_patch16_224", num_classes=5, pretrained=False, checkpoint=path, kwargs=TINY_VIT)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.head.out_features == 5


def test_missing_checkpoint_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"model\.checkpoint='.*nope\.pth' does not exist"):
        build_model("resnet18", num_classes=10, checkpoint=tmp_path / "nope.pth")


def test_failed_download_says_how_to_pass_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise FileNotFoundError("cannot reach the hub")

    monkeypatch.setattr(models.timm, "create_model", offline)
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        build_model("resnet18", num_classes=10, pretrained=True)
    assert "model.checkpoint=/path/to/weights.safetensors" in str(err.value)
    assert "cannot reach the hub" in str(err.value)


def test_data_config_takes_the_run_input_size_not_timms_224() -> None:
    model = build_model("vit_tiny_patch16_224", num_classes=3, pretrained=False, kwargs=TINY_VIT)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 224, 224)
    config = model_data_config(model, image_size=32, crop_pct=1.0)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0
    assert model_data_config(model, image_size=32)["crop_pct"] == timm.data.resolve_model_data_config(model)["crop_pct"]


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    # timm itself would only log the missing keys and leave the backbone at random init.
    other = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path / "resnet18.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(ModelConfigError, match=r"does not fit VisionTransformer .*tensors missing, e\.g\. cls_token"):
        build_model("vit_tiny_patch16_224", num_classes=4, checkpoint=path, kwargs=dict(depth=2, img_size=32))
