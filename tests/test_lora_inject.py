"""Injection into real timm architectures: counts equal the closed form, presets and blocks pick the right
layers, bad settings fail before anything changes, and merged models are plain timm models."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn

from lora_vision.lora import (
    LoRAConfigError,
    LoRALayer,
    apply_lora,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from lora_vision.methods import FullFineTune, LinearProbe, LoRA
from tests.helpers import EFFNET_WEIGHTS, randomize_adapters, tiny_resnet, tiny_vit


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_lora(r: int, fan_in: int, fan_out: int) -> int:
    return r * (fan_in + fan_out)


def conv_lora(r: int, c_in: int, c_out: int, k: int) -> int:
    return r * (c_in * k * k + c_out)


def shapes_only(name: str, **kwargs) -> nn.Module:
    """A timm model on the meta device: every layer and parameter shape, no values. Counting needs nothing more, and
    a ViT-B/16 builds in a fraction of the seconds its random initialisation takes."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


# Per-block adapter parameters of a ViT with width d and MLP width 4d, from the layer shapes alone.
VIT_PRESET_PER_BLOCK = {
    "qv": lambda r, d: 2 * linear_lora(r, d, d),
    "qkv": lambda r, d: 3 * linear_lora(r, d, d),
    "qkv_fused": lambda r, d: linear_lora(r, d, 3 * d),
    "attn": lambda r, d: 4 * linear_lora(r, d, d),
    "mlp": lambda r, d: 2 * linear_lora(r, d, 4 * d),
    "all_linear": lambda r, d: linear_lora(r, d, 3 * d) + linear_lora(r, d, d) + 2 * linear_lora(r, d, 4 * d),
}


@pytest.mark.parametrize(("name", "width"), [("vit_base_patch16_224", 768), ("vit_small_patch16_224", 384)])
@pytest.mark.parametrize("preset", list(VIT_PRESET_PER_BLOCK))
def test_vit_counts_equal_closed_form(name: str, width: int, preset: str) -> None:
    model = shapes_only(name, num_classes=100)
    base_total = n_params(model)
    summary = apply_lora(model, preset, rank=8)
    expected = 12 * VIT_PRESET_PER_BLOCK[preset](8, width)
    head = width * 100 + 100
    assert summary.adapter_params == expected
    assert summary.trainable == expected + head
    assert summary.total == base_total + expected
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_vit_b16_qv_rank8_is_the_published_0_29m() -> None:
    model = shapes_only("vit_base_patch16_224")
    assert apply_lora(model, "qv", rank=8).adapter_params == 294_912


def resnet18_all_convs(r: int) -> int:
    """ResNet-18 (He et al. 2016): 7x7 stem, then 2 BasicBlocks of two 3x3 convs per stage; stages 2-4
    start with a strided block whose shortcut is a 1x1 conv."""
    total = conv_lora(r, 3, 64, 7)
    c_in = 64
    for width in (64, 128, 256, 512):
        total += conv_lora(r, c_in, width, 3) + 3 * conv_lora(r, width, width, 3)
        total += conv_lora(r, c_in, width, 1) if c_in != width else 0
        c_in = width
    return total


def resnet50_conv3x3(r: int) -> int:
    """ResNet-50's 3x3 convs are the bottleneck middles: width w -> w, with 3, 4, 6, 3 blocks per stage."""
    return sum(n * conv_lora(r, w, w, 3) for n, w in zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True))


def resnet50_last_stage(r: int) -> int:
    """Stage 4 of ResNet-50: three bottlenecks 1x1 (in->512), 3x3 (512->512), 1x1 (512->2048), plus the
    strided 1x1 shortcut 1024->2048 of the first block."""
    first = conv_lora(r, 1024, 512, 1) + conv_lora(r, 512, 512, 3) + conv_lora(r, 512, 2048, 1)
    rest = conv_lora(r, 2048, 512, 1) + conv_lora(r, 512, 512, 3) + conv_lora(r, 512, 2048, 1)
    return first + 2 * rest + conv_lora(r, 1024, 2048, 1)


@pytest.mark.parametrize(
    ("name", "preset", "formula"),
    [
        ("resnet18", "all_convs", resnet18_all_convs),
        ("resnet50", "conv3x3", resnet50_conv3x3),
        ("resnet50", "resnet_last_stage", resnet50_last_stage),
    ],
)
def test_resnet_counts_equal_closed_form(name: str, preset: str, formula) -> None:
    model = tiny_resnet(name)
    base_total = n_params(model)
    summary = apply_lora(model, preset, rank=4)
    head = model.get_classifier()
    assert summary.adapter_params == formula(4)
    assert summary.trainable == formula(4) + head.in_features * 10 + 10
    assert summary.total == base_total + formula(4)


def test_zero_initialised_adapters_leave_model_outputs_bitwise_unchanged(images: torch.Tensor) -> None:
    for model, preset, x in [
        (tiny_vit(), "all_linear", images),
        (tiny_vit(), "qv", images),
        (tiny_resnet(), "all_convs", images),
    ]:
        reference = model(x)
        apply_lora(model, preset, rank=4, alpha=32)
        assert torch.equal(model(x), reference)


@pytest.mark.parametrize(
    ("build", "preset"),
    [
        (tiny_vit, "attn"),
        (tiny_vit, "all_linear"),
        (lambda: tiny_resnet(output_stride=8), "all_convs"),  # dilated stages 3-4
        (lambda: tiny_resnet("resnet50"), "all_convs"),
        (
            lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval(),
            "all_convs",
        ),
    ],
)
def test_merged_model_matches_unmerged_and_unmerge_restores(build, preset: str, images: torch.Tensor) -> None:
    model = build()
    original = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EfficientNet's first depthwise conv warns about adapter size
        apply_lora(model, preset, rank=4, alpha=8)
    randomize_adapters(model, std=0.05)
    with torch.no_grad():
        unmerged = model(images)
        merge_lora(model)
        torch.testing.assert_close(model(images), unmerged, atol=1e-4, rtol=1e-4)
        unmerge_lora(model)
    restored = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=0)


def test_merge_and_unload_gives_a_plain_timm_model(images: torch.Tensor) -> None:
    model = tiny_vit()
    apply_lora(model, ["qv", "*mlp.fc2"], rank=4)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(images)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALayer) for m in plain.modules())
    assert lora_layers(model) and not lora_layers(model)[0].merged  # the original is untouched
    fresh = tiny_vit()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert type(fresh.blocks[0].attn.qkv) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), adapted, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in plain.parameters())


def test_only_adapters_and_head_receive_gradients(images: torch.Tensor) -> None:
    model = tiny_vit().train()
    apply_lora(model, "qv", rank=4, dropout=0.1)
    randomize_adapters(model)
    model(images).sum().backward()
    for name, param in model.named_parameters():
        trainable = "lora_" in name or name.startswith("head.")
        assert param.requires_grad == trainable, name
        assert (param.grad is not None) == trainable, name


def test_k_projection_stays_exactly_frozen_after_training(images: torch.Tensor) -> None:
    model = tiny_vit()
    apply_lora(model, "qv", rank=4)
    qkv = model.blocks[0].attn.qkv
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two steps: the first only moves B (A's gradient is zero while B is)
        optimizer.zero_grad()
        model(images).square().mean().backward()
        optimizer.step()
    tokens = torch.randn(2, 17, 64)
    with torch.no_grad():
        adapted, base = qkv(tokens), qkv.base(tokens)
    assert torch.equal(adapted[..., 64:128], base[..., 64:128])
    assert not torch.allclose(adapted[..., :64], base[..., :64])
    assert not torch.allclose(adapted[..., 128:], base[..., 128:])


def test_blocks_restrict_vit_root_level_blocks() -> None:
    model = tiny_vit()  # timm ViTs keep their blocks at the root: `blocks.N`
    summary = apply_lora(model, "qv", rank=2, blocks="-2:")
    assert [x.name for x in summary.layers] == ["blocks.2.attn.qkv", "blocks.3.attn.qkv"]
    model = tiny_vit()
    assert [x.name for x in apply_lora(model, "mlp", rank=2, blocks=[0, -1]).layers] == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.3.mlp.fc1",
        "blocks.3.mlp.fc2",
    ]


def test_blocks_select_resnet_stages() -> None:
    model = tiny_resnet()
    names = [x.name for x in apply_lora(model, "conv3x3", rank=2, blocks=[3, 4]).layers]
    assert names and all(n.startswith(("layer3.", "layer4.")) for n in names)
    assert "conv1" not in names  # the stem belongs to no stage


def test_presets_match_their_descriptions() -> None:
    def names(build, preset: str) -> list[str]:
        return [x.name for x in apply_lora(build(), preset, rank=1).layers]

    assert names(tiny_vit, "qv")[:1] == ["blocks.0.attn.qkv"]
    assert names(tiny_vit, "all_linear")[:4] == [
        f"blocks.0.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert "head" not in names(tiny_vit, "all_linear")
    assert names(tiny_vit, "classifier") == ["head"]
    assert "conv1" in names(tiny_resnet, "all_convs") and "layer2.0.downsample.0" in names(tiny_resnet, "all_convs")
    assert all(n.endswith("conv2") for n in names(lambda: tiny_resnet("resnet50"), "conv3x3"))
    assert names(tiny_resnet, "resnet_last_two_stages")[0] == "layer3.0.conv1"
    effnet = lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)  # noqa: E731
    assert all(".conv_pw" in n or "conv_pwl" in n or n == "conv_head" for n in names(effnet, "conv1x1"))


def test_adapting_the_head_freezes_its_base() -> None:
    model = tiny_vit()
    summary = apply_lora(model, ["qv", "classifier"], rank=2)
    assert not summary.head_trainable
    assert not model.head.base.weight.requires_grad and model.head.lora_A.requires_grad


def test_qkv_selectors_merge_across_targets() -> None:
    model = tiny_vit()
    apply_lora(model, ["blocks.*.attn.qkv:q", "re:blocks\\.[0-9]+\\.attn\\.qkv:v"], rank=2)
    assert model.blocks[1].attn.qkv.parts == "q,v"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(targets="blocks.*.attn.qkvv"),
            r"'blocks\.\*\.attn\.qkvv' matches no .*closest module names: blocks",
        ),
        (dict(targets="conv3x3"), "presets that fit this model: qv, qkv, qkv_fused, attn, mlp, all_linear"),
        (dict(targets=["qv", "nope"]), "'nope' matches no adaptable module"),
        (dict(targets=[]), r"lora.targets must be a non-empty list of strings, got \[\]"),
        (dict(targets="re:blocks.(", rank=2), "not a valid regular expression"),
        (dict(targets="*mlp.fc1:q"), "q/k/v selectors need a fused qkv Linear.*blocks.0.mlp.fc1"),
        (dict(targets=["qv", "*attn.qkv"]), "targeted both whole and as q/k/v slices"),
        (dict(targets="qv", rank=65), r"blocks.0.attn.qkv \(rank 65 exceeds max 64\)"),
        (dict(targets="qv", rank=0), "rank must be an integer >= 1, got 0"),
        (dict(targets="qv", alpha=-1.0), "alpha must be a finite number > 0"),
        (dict(targets="qv", dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
        (dict(targets="qv", blocks=[7]), r"blocks \[7\] do not exist; the model's blocks are \[0, 1, 2, 3\]"),
        (dict(targets="qv", blocks="a:b"), "is not a slice"),
        (dict(targets="patch_embed.proj", blocks="-1:"), "matches no module in blocks"),
    ],
)
def test_bad_settings_fail_before_the_model_changes(kwargs: dict, message: str) -> None:
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAConfigError, match=message):
        apply_lora(model, **{"rank": 4, **kwargs})
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_applying_twice_is_refused() -> None:
    model = tiny_vit()
    apply_lora(model, "qv", rank=2)
    with pytest.raises(LoRAConfigError, match="already has a LoRA adapter"):
        apply_lora(model, "qv", rank=2)


def test_oversized_adapter_warns() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    with pytest.warns(UserWarning, match=r"blocks\.0\.0\.conv_dw adds 328 parameters, more than the 288"):
        apply_lora(model, "all_convs", rank=8)


def test_methods_prepare_models_and_describe_themselves() -> None:
    lora = LoRA(rank=4, targets="qv")
    assert lora.describe() == {
        "method": "lora",
        "rank": 4,
        "alpha": 4.0,
        "dropout": 0.0,
        "targets": ["qv"],
        "blocks": None,
        "variant": "lora",
        "rslora": False,
        "dora": False,
        "init": "lora",
        "rank_pattern": None,
        "alpha_pattern": None,
        "loraplus_lr_ratio": None,
    }
    assert LinearProbe().describe() == {"method": "linear_probe", **dict.fromkeys(set(lora.describe()) - {"method"})}
    with pytest.raises(LoRAConfigError, match=r"unknown LoRA settings \['rnak'\]; valid: \['rank', "):
        LoRA(rnak=4)
    assert lora.apply(tiny_vit()).adapter_params == 4 * 2 * 4 * (64 + 64)
    probe = LinearProbe().apply(tiny_vit())
    assert probe.trainable == 64 * 10 + 10 and probe.adapter_params == 0
    full = FullFineTune().apply(tiny_vit())
    assert full.trainable == full.total
    with pytest.raises(LoRAConfigError, match="rank"):
        LoRA(rank=-1)
    with pytest.raises(LoRAConfigError, match="targets must be a non-empty list"):
        LoRA(targets=[])


def test_summary_table_lists_every_layer() -> None:
    text = str(apply_lora(tiny_vit(), "qv", rank=4))
    assert "blocks.3.attn.qkv  Linear  64->192  q,v" in text
    assert "trainable: 4,746 / " in text  # 4 blocks x 1,024 adapters + 650 head


@pytest.mark.skipif(not EFFNET_WEIGHTS.exists(), reason="pretrained EfficientNet-Lite0 weights not present")
def test_pretrained_efficientnet_lite0_adapters(images: torch.Tensor) -> None:
    model = timm.create_model(
        "tf_efficientnet_lite0", pretrained=True, pretrained_cfg_overlay=dict(file=str(EFFNET_WEIGHTS))
    ).eval()
    reference = model(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = apply_lora(model, ["conv1x1", "classifier"], rank=4)
    assert torch.equal(model(images), reference)
    assert summary.head == "classifier" and not summary.head_trainable
    randomize_adapters(model, std=0.01)
    with torch.no_grad():
        unmerged = model(images)
        merge_lora(model)
        torch.testing.assert_close(model(images), unmerged, atol=1e-4, rtol=1e-4)
