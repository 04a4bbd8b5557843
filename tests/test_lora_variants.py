"""The LoRA family against its definitions: rsLoRA, DoRA, PiSSA, LoRA+, per-layer patterns and BitFit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

import lora_vision.lora.config
from lora_vision.lora import (
    DEFAULT_ADAPTER,
    LoraConfig,
    LoRAConfigError,
    LoRAConv2d,
    LoRALinear,
    apply_lora,
    merge_lora,
    unmerge_lora,
)
from lora_vision.lora.variants import VARIANTS as REGISTERED
from lora_vision.lora.variants import LoraVariant
from lora_vision.methods import BitFit, FullFineTune, LinearProbe, LoRA, method_from_config
from lora_vision.module import Classifier
from lora_vision.report.collect import VARIANT_LABELS
from tests.helpers import composed, randomize_adapters, tiny_resnet, tiny_vit

# Every registered variant alone, and all of them together: a new variant is held to the same properties.
VARIANT_SETTINGS = {v.name: dict([v.setting]) for v in REGISTERED}
VARIANTS = {
    **VARIANT_SETTINGS,
    "+".join(VARIANT_SETTINGS): {k: v for s in VARIANT_SETTINGS.values() for k, v in s.items()},
}
MODELS = {
    "vit q,v + mlp": (tiny_vit, ["qv", "mlp"]),
    # Stages 1-2 only: 3x3 convs and a strided 1x1 downsample, without the slow SVDs of stage 4.
    "resnet stages 1-2": (tiny_resnet, ["re:layer[12]\\..*"]),
}


def dense_lora(base: nn.Linear, layer: LoRALinear, slot: int) -> torch.Tensor:
    return layer.scale * layer.lora_B[slot] @ layer.lora_A[slot]


def test_rslora_scales_by_alpha_over_sqrt_rank() -> None:
    base = nn.Linear(24, 40)
    layer = LoRALinear(copy.deepcopy(base), rank=16, alpha=8.0, rslora=True)
    randomize_adapters(layer)
    assert layer.scale == 8.0 / 4.0
    x = torch.randn(5, 24)
    expected = F.linear(x, base.weight + 2.0 * layer.lora_B[0] @ layer.lora_A[0], base.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def dora_weight(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m * (W0 + dW) / ||W0 + dW||, the norm over everything but the output channel (DoRA, eq. 5)."""
    direction = w0 + delta
    norm = direction.flatten(1).norm(dim=1).view(-1, *[1] * (w0.dim() - 1))
    return magnitude.view_as(norm) * direction / norm


def test_dora_linear_on_q_and_v_equals_its_definition_and_leaves_k_frozen() -> None:
    dim = 16
    base = nn.Linear(dim, 3 * dim)
    layer = LoRALinear(copy.deepcopy(base), rank=2, alpha=4.0, num_slots=3, slots=(0, 2), dora=True)
    x = torch.randn(3, 5, dim)
    assert torch.equal(layer(x), base(x))
    torch.testing.assert_close(layer.lora_magnitude, base.weight.view(3, dim, dim)[[0, 2]].norm(dim=-1))
    randomize_adapters(layer)
    weight = base.weight.detach().clone()
    for slot, rows in ((0, slice(0, dim)), (1, slice(2 * dim, 3 * dim))):
        delta = dense_lora(base, layer, slot)
        weight[rows] = dora_weight(base.weight[rows], delta, layer.lora_magnitude[slot])
    out = layer(x)
    torch.testing.assert_close(out, F.linear(x, weight, base.bias), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[..., dim : 2 * dim], base(x)[..., dim : 2 * dim])
    assert layer.adapter_parameters == 2 * (2 * (dim + dim) + dim)


@pytest.mark.parametrize(
    "make",
    [lambda: nn.Conv2d(8, 16, 3, padding=1), lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False)],
    ids=["conv", "grouped conv"],
)
def test_dora_conv_equals_its_definition(make) -> None:
    base = make()
    layer = LoRAConv2d(copy.deepcopy(base), rank=3, alpha=2.0, dora=True)
    randomize_adapters(layer)
    dense = copy.deepcopy(base)
    with torch.no_grad():
        dense.weight.copy_(dora_weight(base.weight, layer.delta_weight(), layer.lora_magnitude))
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
    assert layer.adapter_parameters == 3 * (8 // base.groups * 9) + 16 * 3 + 16


def test_dora_treats_the_norm_as_a_constant_in_the_backward_pass() -> None:
    # DoRA section 4.3: d/dm of m * V / ||V|| with ||V|| detached is (V x) / ||V||, per output channel.
    base = nn.Linear(6, 4, bias=False)
    layer = LoRALinear(copy.deepcopy(base), rank=2, dora=True)
    randomize_adapters(layer)
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    direction = base.weight + dense_lora(base, layer, 0)
    expected = (x @ direction.T / direction.norm(dim=1)).sum(0)
    torch.testing.assert_close(layer.lora_magnitude.grad[0], expected.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear slots", "conv"])
def test_pissa_starts_from_the_principal_part_and_keeps_w0_untouched(kind: str) -> None:
    if kind == "conv":
        base = nn.Conv2d(8, 12, 3, padding=1)
        layer = LoRAConv2d(copy.deepcopy(base), rank=3, alpha=6.0, init="pissa")
        matrices = [base.weight.detach().flatten(1).double()]
        x = torch.randn(2, 8, 7, 7)
    else:
        base = nn.Linear(10, 30)
        layer = LoRALinear(copy.deepcopy(base), rank=3, alpha=6.0, num_slots=3, slots=(0, 2), init="pissa")
        matrices = [base.weight.detach().view(3, 10, 10)[s].double() for s in (0, 2)]
        x = torch.randn(2, 10)
    assert torch.equal(layer(x), base(x))
    assert torch.equal(layer.base.weight, base.weight)
    b, a = layer._slot_factors(layer.lora_A, layer.lora_B)
    for slot, w0 in enumerate(matrices):
        u, s, vh = torch.linalg.svd(w0)
        principal = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close((layer.scale * b[slot] @ a[slot]).double(), principal, atol=1e-5, rtol=1e-5)
    # The initial factors are frozen buffers of the adapter; only A and B train, as in plain LoRA.
    adapter = layer.adapters[DEFAULT_ADAPTER]
    assert {n for n, _ in adapter.named_buffers()} >= {"pissa_A0", "pissa_B0"}
    assert {n for n, p in adapter.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert {"pissa_A0", "pissa_B0", "lora_A", "lora_B"} <= set(layer.state_dict())  # a single adapter's keys
    a0, b0 = layer.pissa_A0.clone(), layer.pissa_B0.clone()
    randomize_adapters(layer)
    dense = copy.deepcopy(base)
    with torch.no_grad():
        b_now, a_now = layer._slot_factors(layer.lora_A, layer.lora_B)
        b_init, a_init = layer._slot_factors(a0, b0)
        update = layer.scale * (b_now @ a_now - b_init @ a_init)
        dense.weight += layer._slots_to_weight(update)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


def test_rslora_dora_and_pissa_together_compute_their_documented_function() -> None:
    # W' = m * (W0 + dW) / ||W0 + dW|| per output channel, dW = alpha / sqrt(r) * (B A - B0 A0), per adapted slot.
    dim = 12
    base = nn.Linear(dim, 3 * dim)
    family = {"rslora": True, "dora": True, "init": "pissa"}
    layer = LoRALinear(copy.deepcopy(base), rank=2, alpha=3.0, num_slots=3, slots=(0, 2), **family)
    x = torch.randn(4, dim)
    assert torch.equal(layer(x), base(x)) and layer.scale == 3.0 / math.sqrt(2)
    a0, b0 = layer.pissa_A0.clone(), layer.pissa_B0.clone()
    randomize_adapters(layer)
    weight = base.weight.detach().clone()
    for i, slot in enumerate((0, 2)):
        rows = slice(slot * dim, (slot + 1) * dim)
        delta = layer.scale * (layer.lora_B[i] @ layer.lora_A[i] - b0[i] @ a0[i])
        weight[rows] = dora_weight(base.weight[rows], delta, layer.lora_magnitude[i])
    expected = F.linear(x, weight, base.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.base.weight, weight, atol=1e-5, rtol=1e-5)


class HalfScale(LoraVariant):
    """Throwaway variants that both replace the scale; only the test below registers them."""

    name = "halfscale"
    label = "half scale"
    setting = ("rslora", True)

    def scale(self, layer: nn.Module) -> float:
        return layer.alpha / layer.rank / 2


class DoubleScale(HalfScale):
    name = "doublescale"
    label = "double scale"
    setting = ("init", "doubled")

    def scale(self, layer: nn.Module) -> float:
        return 2 * layer.alpha / layer.rank


def test_variants_that_both_replace_the_scale_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    others = [v for v in REGISTERED if v.setting[0] not in ("rslora", "init")]
    registry = tuple(sorted([*others, HalfScale, DoubleScale], key=lambda v: v.name))
    monkeypatch.setattr(lora_vision.lora.config, "VARIANTS", registry)
    message = "LoRA variants doublescale and halfscale do not compose: both override scale"
    with pytest.raises(LoRAConfigError, match=message):
        LoraConfig(init="doubled", rslora=True)
    with pytest.raises(LoRAConfigError, match=message):
        LoRALinear(nn.Linear(8, 8), rank=2, init="doubled", rslora=True)
    # Either one alone composes, with a variant that changes other hooks too.
    assert LoraConfig(init="doubled", dora=True).variant == "dora+doublescale"
    assert LoRALinear(nn.Linear(8, 8), rank=2, alpha=4.0, init="doubled", dora=True).scale == 4.0


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_variants_start_unchanged_and_merge_exactly(variant: str, model_name: str, images: torch.Tensor) -> None:
    make, targets = MODELS[model_name]
    model = make()
    reference = model(images)
    plain = make()
    plain_summary = apply_lora(plain, targets, rank=2, alpha=4.0)
    summary = apply_lora(model, targets, rank=2, alpha=4.0, **VARIANTS[variant])
    assert torch.equal(model(images), reference)
    # Closed form: DoRA adds one magnitude per adapted output channel; the other options add nothing.
    channels = sum(p.numel() for n, p in model.named_parameters() if n.endswith("lora_magnitude"))
    expected_channels = sum(
        layer.base.out_features // layer.num_slots * len(layer.slots)
        if isinstance(layer, LoRALinear)
        else layer.base.out_channels
        for layer in (m for m in model.modules() if isinstance(m, LoRALinear | LoRAConv2d))
    )
    assert channels == (expected_channels if "dora" in variant else 0)
    assert summary.adapter_params == plain_summary.adapter_params + channels
    randomize_adapters(model, std=0.05)
    with torch.no_grad():
        unmerged = model(images)
        assert not torch.allclose(unmerged, reference, atol=1e-3)
        merge_lora(model)
        torch.testing.assert_close(model(images), unmerged, atol=1e-4, rtol=1e-4)
        unmerge_lora(model)
        torch.testing.assert_close(model(images), unmerged, atol=1e-4, rtol=1e-4)


def test_rank_and_alpha_patterns_set_each_layer_and_later_keys_win() -> None:
    model = tiny_vit()
    summary = apply_lora(
        model,
        ["qv", "mlp"],
        rank=2,
        alpha=2.0,
        rank_pattern={"blocks.3.*": 8, "blocks.3.mlp.fc2": 4},
        alpha_pattern={"re:blocks\\.[0-2]\\.attn\\.qkv": 6.0},
    )
    ranks = {layer.name: layer.rank for layer in summary.layers}
    assert ranks["blocks.3.attn.qkv"] == 8 and ranks["blocks.3.mlp.fc1"] == 8 and ranks["blocks.3.mlp.fc2"] == 4
    assert ranks["blocks.0.attn.qkv"] == 2 and ranks["blocks.2.mlp.fc2"] == 2
    assert model.blocks[1].attn.qkv.scale == 3.0 and model.blocks[3].attn.qkv.scale == 2.0 / 8
    # Closed form (dim 64, mlp 256): q,v = 2 slots x r (64 + 64); fc1 = r (64 + 256); fc2 = r (256 + 64).
    per_rank = {"qkv": 2 * 128, "fc1": 320, "fc2": 320}
    expected = 3 * 2 * sum(per_rank.values()) + 8 * (per_rank["qkv"] + per_rank["fc1"]) + 4 * per_rank["fc2"]
    assert summary.adapter_params == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank_pattern={"blocks.9.*": 4}), r"rank_pattern key 'blocks.9.\*' matches none of the targeted"),
        (
            dict(rank_pattern={"blocks.0.*": 0}),
            r"blocks.0.attn.qkv \(from rank_pattern.*rank must be an integer >= 1, got 0",
        ),
        (dict(rank_pattern={"blocks.0.*": "16"}), r"rank must be an integer >= 1, got '16'"),
        (dict(alpha_pattern={"blocks.0.*": -1.0}), r"alpha must be a finite number > 0"),
        (dict(rank_pattern={"blocks.0.*": 65}), r"blocks.0.attn.qkv \(rank 65 exceeds max 64\)"),
        (dict(init="svd"), r"init='svd' is not one of lora, pissa"),
        (dict(dora="yes"), r"lora.dora must be true or false, got 'yes'"),
    ],
)
def test_bad_variant_settings_fail_before_the_model_changes(kwargs: dict, message: str) -> None:
    model = tiny_vit()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoRAConfigError, match=message):
        apply_lora(model, "qv", rank=2, **kwargs)
    assert model.state_dict().keys() == before.keys()


def test_loraplus_trains_b_with_a_larger_learning_rate() -> None:
    model = tiny_vit()
    method = LoRA(rank=2, targets=["qv"], loraplus_lr_ratio=16)
    method.apply(model)
    module = Classifier(model, 10, lr=1e-3, weight_decay=0.05, lr_ratios=method.lr_ratios(model))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(g["lr"], g["weight_decay"], {names[id(p)].rsplit(".", 1)[-1] for p in g["params"]}) for g in
              module.param_groups()]  # fmt: skip
    assert (pytest.approx(16e-3), 0.05, {"lora_B"}) in groups
    assert (pytest.approx(1e-3), 0.05, {"lora_A", "weight"}) in groups
    assert (pytest.approx(1e-3), 0.0, {"bias"}) in groups
    assert method.variant == "loraplus" and LoRA().lr_ratios(model) == {}
    # Another adapter on the same layers keeps the base learning rate for its B.
    apply_lora(model, "qv", rank=2, adapter_name="other")
    module = Classifier(model, 10, lr=1e-3, weight_decay=0.05, lr_ratios=method.lr_ratios(model))
    names = {id(p): n for n, p in model.named_parameters()}
    fast = {names[id(p)] for g in module.param_groups() if g["lr"] == pytest.approx(16e-3) for p in g["params"]}
    assert fast and all(".adapters.default.lora_B" in name for name in fast)


def test_bitfit_trains_every_bias_and_the_head() -> None:
    summary = BitFit().apply(tiny_vit())
    # Per block: norm1 64 + qkv 192 + proj 64 + norm2 64 + fc1 256 + fc2 64; then patch embed 64, final norm 64 and
    # the head 64 x 10 + 10.
    assert summary.trainable == 4 * 704 + 64 + 64 + 650
    resnet = tiny_resnet()
    BitFit().apply(resnet)
    trainable = {n for n, p in resnet.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in resnet.named_parameters() if n.endswith(".bias")} | {"fc.weight"}


@pytest.mark.parametrize(
    "method",
    [
        LoRA(rank=2, targets=["qv", "mlp"], dora=True, init="pissa", rank_pattern={"blocks.0.*": 4}),
        LoRA(rank=4, alpha=8.0, rslora=True, loraplus_lr_ratio=8.0, blocks="-2:"),
        BitFit(),
        LinearProbe(),
        FullFineTune(),
    ],
    ids=lambda m: m.name,
)
def test_config_rebuilds_an_equal_method(method) -> None:
    rebuilt = method_from_config(method.config())
    assert type(rebuilt) is type(method) and rebuilt.describe() == method.describe()
    first, second = tiny_vit(), tiny_vit()
    assert method.apply(first).to_dict() == rebuilt.apply(second).to_dict()


def test_the_registry_holds_each_variant_with_its_config_and_label() -> None:
    assert [v.name for v in REGISTERED] == ["dora", "pissa", "rslora"]
    for variant in REGISTERED:
        with composed(f"lora={variant.name}") as cfg:
            assert instantiate(cfg.lora).variant == variant.name
        assert VARIANT_LABELS[variant.name] == variant.label
        layer = LoRALinear(nn.Linear(8, 8), rank=2, **dict([variant.setting]))
        assert [type(v) for v in layer.variants] == [variant] and layer.variant == variant.name


def test_variant_names() -> None:
    assert LoRA().variant == "lora"
    assert LoRA(dora=True, rslora=True).variant == "dora+rslora"
    assert LoRA(init="pissa", loraplus_lr_ratio=16).variant == "pissa+loraplus"
    assert math.isclose(LoRA(rank=4, alpha=8).describe()["alpha"], 8.0)
