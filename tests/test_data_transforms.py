"""Transforms follow the timm data config given, through timm's factory."""

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from lora_vision.data.transforms import DEFAULT_DATA_CONFIG, build_transform, normalize_data_config

CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.5, 0.25, 0.0),
    "std": (0.5, 0.25, 1.0),
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def gradient_image(width=32, height=32):
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 8 % 256, y * 8 % 256, 128) for y in range(height) for x in range(width)])
    return image


def test_eval_with_crop_pct_one_keeps_a_tiny_image_whole_and_normalizes_with_the_config():
    image = gradient_image()
    out = build_transform(CONFIG, is_training=False)(image)
    expected = pil_to_tensor(image).float() / 255
    mean, std = torch.tensor(CONFIG["mean"]).view(3, 1, 1), torch.tensor(CONFIG["std"]).view(3, 1, 1)
    torch.testing.assert_close(out, (expected - mean) / std)


def test_eval_center_crops_per_crop_pct():
    out = build_transform({**CONFIG, "crop_pct": 0.5}, is_training=False)(gradient_image())
    # Resize 32 -> 64, then the central 32x32: the red ramp starts at a quarter of the original width.
    assert out.shape == (3, 32, 32)
    assert out[0, 0, 0].item() == pytest.approx((64 / 255 - 0.5) / 0.5, abs=0.02)


@pytest.mark.parametrize("is_training", [True, False])
def test_output_follows_input_size_not_the_image_size(is_training):
    out = build_transform({**CONFIG, "input_size": (3, 24, 40)}, is_training=is_training)(gradient_image(50, 70))
    assert out.shape == (3, 24, 40)


def test_augment_false_trains_on_the_eval_transform():
    image = gradient_image()
    train = build_transform(CONFIG, is_training=True, augment=False)(image)
    torch.testing.assert_close(train, build_transform(CONFIG, is_training=False)(image))


def test_augment_mapping_reaches_timm():
    transform = build_transform(
        CONFIG, is_training=True, augment={"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.25, "scale": [0.5, 1.0]}
    )
    names = repr(transform)
    assert "RandAugment" in names and "RandomErasing" in names and "scale=(0.5, 1.0)" in names
    assert transform(gradient_image()).shape == (3, 32, 32)


def test_unknown_keys_and_bad_input_size_are_named():
    with pytest.raises(ValueError, match=r"train_augment has keys \['hflp'\].*valid keys"):
        build_transform(CONFIG, is_training=True, augment={"hflp": 0.5})
    with pytest.raises(ValueError, match=r"data_config has keys \['size'\]"):
        normalize_data_config({"size": 3})
    with pytest.raises(ValueError, match=r"\(channels, height, width\), got \(32, 32\)"):
        normalize_data_config({"input_size": [32, 32]})
    with pytest.raises(ValueError, match="train_augment must be a bool or a mapping"):
        build_transform(CONFIG, is_training=True, augment="yes")


def test_default_config_is_timms_for_a_model_without_pretrained_config():
    from timm.data import resolve_model_data_config

    assert resolve_model_data_config(torch.nn.Linear(2, 2)) == DEFAULT_DATA_CONFIG
