"""Speed and memory options: each leaves the function, the gradients and the parameter names as they were."""

from __future__ import annotations

import copy

import pytest
import timm.layers
import torch
from torch import nn

from lora_vision.lora import apply_lora
from lora_vision.performance import PerformanceOptionError, apply_performance_options
from tests.helpers import randomize_adapters, tiny_resnet, tiny_vit


def adapted_vit() -> nn.Module:
    model = tiny_vit()
    apply_lora(model, ("qv", "mlp"), rank=4, alpha=8.0)
    randomize_adapters(model)
    return model.train()


def outputs_and_gradients(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(images)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training(reference: nn.Module, optimised: nn.Module, images: torch.Tensor, atol: float) -> None:
    assert list(optimised.state_dict()) == list(reference.state_dict())
    ref_out, ref_grads = outputs_and_gradients(reference, images)
    out, grads = outputs_and_gradients(optimised, images)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], atol=atol, rtol=0, msg=name)


def test_grad_checkpointing_recomputes_the_same_gradients(images) -> None:
    reference = adapted_vit()
    checkpointed = apply_performance_options(copy.deepcopy(reference), grad_checkpointing=True)
    assert checkpointed.grad_checkpointing
    # Recomputation runs the same ops on the same inputs: bit-identical, including the first block's adapters,
    # whose input (the patch embedding) does not require gradients.
    assert_same_training(reference, checkpointed, images, atol=0)


def test_reentrant_checkpointing_is_refused_because_it_would_drop_adapter_gradients() -> None:
    timm.layers.set_reentrant_ckpt(True)
    try:
        with pytest.raises(PerformanceOptionError, match="non-reentrant"):
            apply_performance_options(adapted_vit(), grad_checkpointing=True)
    finally:
        timm.layers.set_reentrant_ckpt(False)


def test_grad_checkpointing_on_a_model_without_it_names_the_option() -> None:
    with pytest.raises(PerformanceOptionError, match=r"perf\.grad_checkpointing=true: Sequential"):
        apply_performance_options(nn.Sequential(nn.Linear(2, 2)), grad_checkpointing=True)


def test_channels_last_convnet_with_conv_adapters(images) -> None:
    reference = tiny_resnet()
    apply_lora(reference, ("conv3x3",), rank=4, alpha=4.0)
    randomize_adapters(reference)
    # Eval-mode BatchNorm (as a frozen backbone's is): batch statistics of two images would amplify rounding.
    reference.eval()
    nhwc = apply_performance_options(copy.deepcopy(reference), channels_last=True)
    conv = nhwc.layer1[0].conv2
    assert conv.base.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.conv1(images).is_contiguous(memory_format=torch.channels_last)
    assert_same_training(reference, nhwc, images, atol=1e-4)


def test_compile_keeps_parameter_names_and_the_function(images) -> None:
    reference = adapted_vit()
    # aot_eager traces through dynamo and AOTAutograd (our fused LoRA node included) without the C++ build
    # inductor would spend a minute on; the user-facing default is inductor.
    compiled = apply_performance_options(copy.deepcopy(reference), compile={"backend": "aot_eager"})
    assert_same_training(reference, compiled, images, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compile": "fast"}, r"perf\.compile='fast' is invalid"),
        ({"compile": {"mod": "max-autotune"}}, r"perf\.compile has keys \['mod'\].*'mode'"),
        ({"channels_last": "yes"}, r"perf\.channels_last='yes' is invalid: expected true or false"),
        ({"grad_checkpointing": 1}, r"perf\.grad_checkpointing=1 is invalid"),
    ],
)
def test_bad_option_values_name_the_key_before_anything_is_applied(options: dict, message: str) -> None:
    model = adapted_vit()
    with pytest.raises(PerformanceOptionError, match=message):
        apply_performance_options(model, **options)
    assert not model.grad_checkpointing
