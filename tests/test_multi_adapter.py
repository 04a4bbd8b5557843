"""Several named adapters on one model: each sample of a mixed batch gets exactly what the model holding only its
adapter gives it, for every layer kind; active sets, merging, gradients, state-dict keys and loading several
adapter files onto one base."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lora_vision.adapters import (
    AdapterMismatchError,
    load_adapted_model,
    load_adapters,
    save_adapter,
    weights_fingerprint,
)
from lora_vision.export import main as export_main
from lora_vision.lora import (
    AdapterHeads,
    AdapterNameError,
    LoRAConfigError,
    LoRALayer,
    RoutingError,
    apply_lora,
    delete_adapter,
    forward_routed,
    merge_lora,
    model_adapter_names,
    named_lora_layers,
    route,
    set_active_adapters,
    summarize,
    unmerge_lora,
)
from lora_vision.methods import BitFit, LoRA
from tests.helpers import VIT_KWARGS, adapted, randomize_adapters, tiny_resnet, tiny_vit

# Each model gets three adapters that differ in rank, alpha, targets, blocks and variants; every layer kind is
# adapted by two of them with different settings (q/k/v slots of one fused qkv differently per adapter, grouped and
# depthwise convs).
ADAPTERS = {
    "vit": {
        "a": dict(targets=["qv"], rank=4, alpha=8.0),
        "b": dict(targets=["qkv", "mlp"], rank=2, blocks="-2:", dora=True),
        "c": dict(targets=["attn"], rank=3, rslora=True, init="pissa"),
    },
    "resnet": {
        "a": dict(targets=["conv3x3"], rank=4),
        "b": dict(targets=["all_convs"], rank=2, blocks=[4], dora=True),
        "c": dict(targets=["conv1x1", "classifier"], rank=3, rslora=True),
    },
    "mobilenet": {
        # timm's MobileNetV3 has depthwise convs (groups = channels); all_convs takes them, conv3x3 too.
        "a": dict(targets=["all_convs"], rank=2),
        "b": dict(targets=["conv3x3"], rank=1, dora=True),
        "c": dict(targets=["conv1x1"], rank=2, init="pissa"),
    },
}
ROUTING = ["a", "b", None, "c", "a", "c", "b", None]


def tiny_mobilenet() -> nn.Module:
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10).eval()


MAKE = {"vit": tiny_vit, "resnet": tiny_resnet, "mobilenet": tiny_mobilenet}


def multi(kind: str) -> nn.Module:
    """A model of `kind` with adapters a, b, c (non-zero updates), the head frozen (shared by all)."""
    torch.manual_seed(0)
    model = MAKE[kind]()
    for name, settings in ADAPTERS[kind].items():
        apply_lora(model, adapter_name=name, train_head=False, **settings)
    randomize_adapters(model)
    return model.eval()


def only(model: nn.Module, name: str | None) -> nn.Module:
    """A copy of `model` holding only adapter `name` (None: none), as if it had been the only one added."""
    single = copy.deepcopy(model)
    for other in model_adapter_names(model):
        if other != name:
            delete_adapter(single, other)
    return single


def images(kind: str, n: int = len(ROUTING)) -> torch.Tensor:
    size = 32 if kind != "mobilenet" else 64
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(MAKE))
def test_a_mixed_batch_gives_every_sample_the_logits_of_its_own_adapter_s_model(kind: str) -> None:
    model, x = multi(kind), images(kind)
    with torch.no_grad():
        routed = forward_routed(model, x, ROUTING)
        for name in {*ROUTING}:
            rows = [i for i, routed_to in enumerate(ROUTING) if routed_to == name]
            alone = only(model, name)(x)
            torch.testing.assert_close(routed[rows], alone[rows], atol=1e-6, rtol=1e-6)
    # The adapters differ, so a routing that sent everything through one adapter would have failed above.
    assert not torch.allclose(only(model, "a")(x), only(model, "b")(x), atol=1e-3)


@pytest.mark.parametrize("kind", list(MAKE))
def test_the_active_adapter_applies_to_every_sample_exactly(kind: str) -> None:
    model, x = multi(kind), images(kind)
    set_active_adapters(model, "b")
    with torch.no_grad():
        assert torch.equal(model(x), only(model, "b")(x))


def test_active_adapters_sum_their_updates_unless_one_rescales_the_output() -> None:
    model, x = multi("vit"), images("vit")
    set_active_adapters(model, ["a", "c"])
    layer, tokens = model.blocks[0].attn.qkv, torch.randn(2, 5, 64)
    with torch.no_grad():
        base = layer.base(tokens)
        updates = [layer.adapters[name].forward_with_base(tokens) - base for name in ("a", "c")]
        torch.testing.assert_close(layer(tokens), base + updates[0] + updates[1], atol=1e-6, rtol=1e-6)
        set_active_adapters(model, ["a", "b"])
        with pytest.raises(LoRAConfigError, match=r"adapter 'b' \(dora\) rescales the layer's whole output"):
            model(x)


def test_a_routed_step_gives_each_adapter_the_gradient_of_its_own_samples() -> None:
    model, x = multi("vit"), images("vit")
    labels = torch.arange(len(ROUTING)) % 10
    with route(model, ROUTING):
        F.cross_entropy(model(x), labels, reduction="sum").backward()
    for name in ("a", "b", "c"):
        rows = [i for i, routed_to in enumerate(ROUTING) if routed_to == name]
        alone = only(model, name)
        for param in alone.parameters():
            param.grad = None
        F.cross_entropy(alone(x[rows]), labels[rows], reduction="sum").backward()
        for layer_name, layer in named_lora_layers(alone).items():
            ours = model.get_submodule(layer_name).adapters[name]
            for param_name, param in layer.adapters[name].named_parameters():
                reference = param.grad
                torch.testing.assert_close(ours.get_parameter(param_name).grad, reference, atol=1e-6, rtol=1e-5)


def test_a_merge_is_refused_while_several_adapters_are_active_and_exact_for_one() -> None:
    model, x = multi("resnet"), images("resnet")
    with pytest.raises(LoRAConfigError, match="adapters a, b, c are active"):
        merge_lora(model)
    set_active_adapters(model, "c")
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        with pytest.raises(RoutingError, match="unmerge before routing"), route(model, ROUTING):
            pass
        unmerge_lora(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_a_routing_that_does_not_fit_is_one_message() -> None:
    model, x = multi("vit"), images("vit")
    with pytest.raises(
        RoutingError, match=re.escape("adapter 'woof', which the model does not hold; it holds a, b, c")
    ):
        forward_routed(model, x, ["a", "woof"] * 4)
    with pytest.raises(RoutingError, match="an adapter for 3 samples, but a routed layer got a batch of 8"):
        forward_routed(model, x, ["a", "b", "c"])
    with pytest.raises(AdapterNameError, match="holds no adapter 'd'; it holds a, b, c"):
        set_active_adapters(model, "d")
    with pytest.raises(LoRAConfigError, match="already has a LoRA adapter named 'a'"):
        apply_lora(model, "qv", adapter_name="a")


def test_state_dict_keys_name_every_adapter_but_the_default_and_load_back() -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    apply_lora(model, "qv", rank=2)
    apply_lora(model, "qv", rank=3, adapter_name="woof", dora=True)
    keys = set(model.state_dict())
    assert {"blocks.0.attn.qkv.lora_A", "blocks.0.attn.qkv.adapters.woof.lora_A"} <= keys
    assert "blocks.0.attn.qkv.adapters.woof.lora_magnitude" in keys
    assert not any(".adapters.default." in key for key in keys)
    randomize_adapters(model)
    torch.manual_seed(0)
    twin = tiny_vit()
    apply_lora(twin, "qv", rank=2)
    apply_lora(twin, "qv", rank=3, adapter_name="woof", dora=True)
    twin.load_state_dict(model.state_dict(), strict=True)
    x = images("vit")
    with torch.no_grad():
        routing = ["woof", "default"] * 4
        assert torch.equal(forward_routed(twin, x, routing), forward_routed(model, x, routing))


def test_removing_every_adapter_gives_back_the_plain_model() -> None:
    model = multi("resnet")
    plain = tiny_resnet()
    for name in ("a", "b", "c"):
        delete_adapter(model, name)
    assert not named_lora_layers(model)
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_the_summary_lists_every_adapter_of_every_layer() -> None:
    summary = summarize(multi("vit"))
    names = [row.name for row in summary.layers]
    assert "blocks.0.attn.qkv [a]" in names and "blocks.3.mlp.fc1 [b]" in names and "blocks.0.attn.proj [c]" in names
    assert summary.adapter_params == sum(row.params for row in summary.layers)


def saved_adapters(tmp_path: Path) -> dict[str, Path]:
    """Two adapters trained (here: perturbed) on the same base, each with its own head, one exported for PEFT."""
    woof = tmp_path / "woof"
    adapted(tiny_vit, LoRA(rank=4, targets=["qv"]), woof, "vit_small_patch16_224", VIT_KWARGS)
    cifar = tmp_path / "cifar"
    adapted(tiny_vit, LoRA(rank=2, targets=["mlp"], dora=True), cifar, "vit_small_patch16_224", VIT_KWARGS)
    export_main([str(cifar), "--format", "peft", "--out", str(tmp_path / "cifar_peft")])
    return {"woof": woof, "cifar": tmp_path / "cifar_peft"}


def test_loaded_adapters_route_each_sample_as_its_own_loaded_model(tmp_path: Path) -> None:
    sources = saved_adapters(tmp_path)
    torch.manual_seed(0)  # the base the adapters were trained on (tests.helpers.adapted)
    model = load_adapters(sources, tiny_vit())
    assert isinstance(model.head, AdapterHeads) and model_adapter_names(model) == ["woof", "cifar"]
    x = images("vit")
    routing = ["woof", "cifar"] * 4
    with torch.no_grad():
        routed = forward_routed(model, x, routing)
        for name, source in sources.items():
            alone, _ = load_adapted_model(source)
            rows = [i for i, routed_to in enumerate(routing) if routed_to == name]
            torch.testing.assert_close(routed[rows], alone(x)[rows], atol=1e-6, rtol=1e-6)
        set_active_adapters(model, "cifar")
        torch.testing.assert_close(model(x), load_adapted_model(sources["cifar"])[0](x), atol=1e-6, rtol=1e-6)


def test_adapters_that_cannot_share_a_base_are_refused_naming_the_adapter(tmp_path: Path) -> None:
    sources = saved_adapters(tmp_path)
    other_classes = tmp_path / "seven"
    torch.manual_seed(0)
    seven = tiny_vit(num_classes=7)
    fingerprint = weights_fingerprint(seven)
    LoRA(rank=2).apply(seven)
    source = {"pretrained": False, "checkpoint": None, "seed": 0}
    save_adapter(
        seven, other_classes, model_name="vit_small_patch16_224", model_kwargs=VIT_KWARGS, num_classes=7,
        method_config=LoRA(rank=2).config(), base_fingerprint=fingerprint, base_source=source,
    )  # fmt: skip
    torch.manual_seed(0)
    with pytest.raises(AdapterMismatchError, match=r"adapter 'seven' \(.*seven\): adapter was trained on .* 7 classes"):
        load_adapters({"woof": sources["woof"], "seven": other_classes}, tiny_vit())
    bitfit = tmp_path / "bitfit"
    adapted(tiny_vit, BitFit(), bitfit, "vit_small_patch16_224", VIT_KWARGS)
    torch.manual_seed(0)
    with pytest.raises(AdapterMismatchError, match=r"adapter 'bitfit' .*changes the base model's .*bias"):
        load_adapters({"woof": sources["woof"], "bitfit": bitfit}, tiny_vit())
    torch.manual_seed(0)
    carrying = tiny_vit()
    apply_lora(carrying, "qv")
    with pytest.raises(AdapterMismatchError, match="already carries adapters"):
        load_adapters(sources, carrying)
    assert all(not isinstance(m, LoRALayer) for m in tiny_vit().modules())
