"""Where PEFT can express the same adapter, ours computes the same function with the same parameter count."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_vision.lora import apply_lora, lora_layers
from tests.helpers import randomize_adapters, tiny_resnet, tiny_vit

peft = pytest.importorskip("peft", reason="peft is a dev dependency")


def peft_twin(model: nn.Module, target_modules: str | list[str], rank: int, alpha: float) -> nn.Module:
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules)
    return peft.get_peft_model(copy.deepcopy(model), config)


def copy_adapters_into_peft(ours: nn.Module, theirs: nn.Module) -> int:
    """Copy our A and B into PEFT's (same names below `base_model.model`); returns how many layers."""
    twins = dict(theirs.base_model.model.named_modules())
    layers = [(n, m) for n, m in ours.named_modules() if m in lora_layers(ours)]
    with torch.no_grad():
        for name, layer in layers:
            twin = twins[name]
            twin.lora_A["default"].weight.copy_(layer.lora_A.view_as(twin.lora_A["default"].weight))
            twin.lora_B["default"].weight.copy_(layer.lora_B.view_as(twin.lora_B["default"].weight))
    return len(layers)


def lora_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize(
    ("build", "ours_targets", "peft_targets"),
    [
        (tiny_vit, "qkv_fused", ["qkv"]),
        (tiny_vit, "all_linear", r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"),
        (tiny_resnet, "all_convs", r"(conv1|layer\d\.\d\.conv\d|layer\d\.0\.downsample\.0)"),
        (lambda: tiny_resnet("resnet50"), "conv3x3", r"layer\d\.\d+\.conv2"),
    ],
)
def test_same_function_and_parameter_count_as_peft(build, ours_targets, peft_targets, images) -> None:
    base = build()
    ours = copy.deepcopy(base)
    apply_lora(ours, ours_targets, rank=4, alpha=8, train_head=False)
    randomize_adapters(ours, std=0.05)
    theirs = peft_twin(base, peft_targets, rank=4, alpha=8).eval()
    assert copy_adapters_into_peft(ours, theirs) == len(lora_layers(ours))
    assert lora_parameter_count(ours) == lora_parameter_count(theirs)
    trainable_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable_ours == theirs.get_nb_trainable_parameters()[0]
    with torch.no_grad():
        expected = theirs(images)
        torch.testing.assert_close(ours(images), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, base(images), atol=1e-3)  # the adapters really do something


def test_q_v_slices_match_peft_count_but_not_its_function(images) -> None:
    """The LoRA paper's Wq, Wv: same budget as PEFT's whole-qkv adapter, but k stays frozen."""
    ours = tiny_vit()
    summary = apply_lora(ours, "qv", rank=4, train_head=False)
    theirs = peft_twin(tiny_vit(), ["qkv"], rank=4, alpha=4)
    assert summary.adapter_params == lora_parameter_count(theirs)
