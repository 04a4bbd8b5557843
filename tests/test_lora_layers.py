"""The LoRA layers compute exactly W0 x + b + (alpha / r) B A x, and merge into the same function."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from lora_vision.lora import LoRAConfigError, LoRAConv2d, LoRALinear, fused_conv
from tests.helpers import composed_forward, randomize_adapters

CONVS = {
    "3x3": lambda: nn.Conv2d(8, 16, 3, padding=1),
    "7x7 stem, stride 2": lambda: nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False),
    "1x1 strided downsample": lambda: nn.Conv2d(8, 16, 1, stride=2, bias=False),
    "dilated": lambda: nn.Conv2d(8, 16, 3, padding=2, dilation=2, bias=False),
    "reflect padding": lambda: nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"),
    "timm TF-same, stride 2": lambda: Conv2dSame(8, 16, 3, stride=2, bias=False),
    "grouped": lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False),
    "depthwise": lambda: nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False),
}


def dense_conv(base: nn.Conv2d, layer: LoRAConv2d) -> nn.Conv2d:
    """The base conv with W0 + scale * dW, dW[o, c, i, j] = sum_k B[o, k] A[k, c, i, j]."""
    dense = copy.deepcopy(base)
    with torch.no_grad():
        dense.weight += layer.scale * torch.einsum("ok,kcij->ocij", layer.lora_B, layer.lora_A)
    return dense


def test_linear_equals_dense_update() -> None:
    base = nn.Linear(24, 40)
    layer = LoRALinear(copy.deepcopy(base), rank=4, alpha=6.0)
    randomize_adapters(layer)
    x = torch.randn(5, 7, 24)
    weight = base.weight + 1.5 * layer.lora_B[0] @ layer.lora_A[0]
    torch.testing.assert_close(layer(x), F.linear(x, weight, base.bias), atol=1e-5, rtol=1e-5)


def test_fused_qkv_slices_equal_dense_update_and_leave_k_frozen() -> None:
    dim = 16
    base = nn.Linear(dim, 3 * dim)
    layer = LoRALinear(copy.deepcopy(base), rank=2, alpha=4.0, num_slots=3, slots=(0, 2))
    randomize_adapters(layer)
    weight = base.weight.detach().clone()
    weight[:dim] += 2.0 * layer.lora_B[0] @ layer.lora_A[0]  # q
    weight[2 * dim :] += 2.0 * layer.lora_B[1] @ layer.lora_A[1]  # v
    x = torch.randn(3, 5, dim)
    out = layer(x)
    torch.testing.assert_close(out, F.linear(x, weight, base.bias), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[..., dim : 2 * dim], base(x)[..., dim : 2 * dim])
    assert layer.parts == "q,v"
    assert layer.adapter_parameters == 2 * 2 * (dim + dim)


@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_equals_dense_update(kind: str) -> None:
    base = CONVS[kind]()
    layer = LoRAConv2d(copy.deepcopy(base), rank=3, alpha=2.0)
    randomize_adapters(layer)
    x = torch.randn(2, base.in_channels, 13, 11)
    torch.testing.assert_close(layer(x), dense_conv(base, layer)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_merge_unmerge(kind: str) -> None:
    base = CONVS[kind]()
    layer = LoRAConv2d(copy.deepcopy(base), rank=3, alpha=2.0).eval()
    randomize_adapters(layer)
    x = torch.randn(2, base.in_channels, 12, 12)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base.weight, dense_conv(base, layer).weight)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, base.weight, atol=1e-6, rtol=0)


def test_linear_merge_unmerge() -> None:
    base = nn.Linear(16, 48)
    layer = LoRALinear(copy.deepcopy(base), rank=4, num_slots=3, slots=(0, 1, 2)).eval()
    randomize_adapters(layer)
    x = torch.randn(4, 16)
    unmerged = layer(x)
    layer.merge()
    layer.merge()  # idempotent: folding twice would double the update
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, base.weight, atol=1e-6, rtol=0)


def test_zero_initialised_adapter_is_exact_identity() -> None:
    for base, x in [
        (nn.Linear(16, 48), torch.randn(3, 16)),
        (CONVS["timm TF-same, stride 2"](), torch.randn(2, 8, 9, 9)),
        (CONVS["depthwise"](), torch.randn(2, 8, 9, 9)),
    ]:
        layer = (
            LoRALinear(copy.deepcopy(base), rank=4, num_slots=3, slots=(0, 2))
            if isinstance(base, nn.Linear)
            else LoRAConv2d(copy.deepcopy(base), rank=4)
        )
        assert torch.count_nonzero(layer.lora_B) == 0
        assert torch.equal(layer(x), base(x))


def test_initialisation_follows_hu_et_al() -> None:
    layer = LoRALinear(nn.Linear(100, 300), rank=8, num_slots=3, slots=(0, 2))
    # kaiming_uniform_(a=sqrt(5)) on each A_i: U(-1/sqrt(in), 1/sqrt(in)), the bound of nn.Linear's own init.
    bound = 1 / math.sqrt(100)
    for a in layer.lora_A:
        assert a.abs().max() <= bound
        assert a.abs().max() > 0.9 * bound
    conv = LoRAConv2d(nn.Conv2d(8, 16, 3), rank=4)
    assert conv.lora_A.abs().max() <= 1 / math.sqrt(8 * 9)
    assert torch.count_nonzero(conv.lora_B) == 0


def test_scale_is_a_float_even_when_alpha_is_below_rank() -> None:
    layer = LoRALinear(nn.Linear(8, 8), rank=16 // 2, alpha=1)
    assert layer.scale == pytest.approx(0.125)
    randomize_adapters(layer)
    x = torch.randn(2, 8)
    assert not torch.allclose(layer(x), layer.base(x))
    assert LoRALinear(nn.Linear(8, 8), rank=4).scale == 1.0  # alpha=None means alpha = rank


def test_base_is_frozen_and_gradients_reach_only_adapters() -> None:
    layer = LoRAConv2d(nn.Conv2d(4, 8, 3, padding=1), rank=2, dropout=0.5).train()
    randomize_adapters(layer)
    layer(torch.randn(2, 4, 6, 6)).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_training_a_merged_layer_is_refused() -> None:
    layer = LoRALinear(nn.Linear(4, 4), rank=2).train()
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(1, 4))
    with torch.no_grad():
        layer(torch.randn(1, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0), "rank must be an integer >= 1, got 0"),
        (dict(rank=2.5), "rank must be an integer"),
        (dict(rank=2, alpha=0), "alpha must be a finite number > 0"),
        (dict(rank=2, alpha=float("nan")), "alpha must be a finite number > 0"),
        (dict(rank=2, dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(rank=2, dropout=-0.1), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(LoRAConfigError, match=message):
        LoRALinear(nn.Linear(4, 4), **kwargs)


@pytest.mark.parametrize("tokens", [3, 400], ids=["few tokens: added into the output", "many: folded into W"])
@pytest.mark.parametrize(("num_slots", "slots", "dropout"), [(1, None, 0.0), (3, (0, 2), 0.0), (3, (1,), 0.3)])
def test_fused_node_matches_the_composed_ops(tokens: int, num_slots: int, slots, dropout: float) -> None:
    layer = LoRALinear(nn.Linear(24, 36), rank=4, alpha=6.0, num_slots=num_slots, slots=slots, dropout=dropout)
    randomize_adapters(layer)
    x = torch.randn(tokens, 24, requires_grad=True)
    grad = torch.randn(tokens, 36)
    results = []
    for forward in (layer, lambda x: composed_forward(layer, x)):
        torch.manual_seed(1)  # the same dropout mask for both
        out = forward(x)
        out.backward(grad)
        results.append((out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad))
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    assert type(layer(x).grad_fn).__name__ == "_LinearWithLowRankBackward"
    # Gradients are sums over the tokens, accumulated in another order by the fused GEMMs.
    for fused, composed in zip(*results, strict=True):
        torch.testing.assert_close(fused, composed, atol=1e-4, rtol=1e-4)


def test_fused_node_under_bf16_autocast_matches_the_composed_ops() -> None:
    layer = LoRALinear(nn.Linear(24, 36), rank=4, num_slots=3, slots=(0, 2))
    randomize_adapters(layer)
    x = torch.randn(400, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, composed = layer(x), composed_forward(layer, x)
    assert fused.dtype == composed.dtype == torch.bfloat16
    torch.testing.assert_close(fused, composed, atol=0.05, rtol=0.02)
    fused.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_fused_node_refuses_a_trainable_base_weight() -> None:
    layer = LoRALinear(nn.Linear(4, 4), rank=2)
    layer.base.weight.requires_grad_(True)
    # The layer itself takes the composed path then, so the base weight still gets its gradient.
    layer(torch.randn(3, 4)).sum().backward()
    assert layer.base.weight.grad is not None


def _conv_results(layer: LoRAConv2d, x: torch.Tensor, forward) -> tuple[torch.Tensor | None, ...]:
    """Output, and the gradients of x, A and B for a fixed output gradient, through `forward`."""
    out = forward(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    results = (out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    return results


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels-last"])
@pytest.mark.parametrize(
    "fold", [(False, False), (True, True), (True, False), (False, True)], ids=["add", "fold", "fold-fwd", "fold-bwd"]
)
@pytest.mark.parametrize("kind", list(CONVS))
def test_fused_conv_node_matches_the_composed_ops(kind: str, fold, layout, monkeypatch) -> None:
    # Which pass folds the update into the kernel depends on the shapes; each combination is forced here.
    monkeypatch.setattr(fused_conv, "_fold", lambda x, weight, positions: fold)
    layer = LoRAConv2d(CONVS[kind](), rank=3, alpha=2.0)
    randomize_adapters(layer, std=0.5)
    x = torch.randn(2, layer.base.in_channels, 13, 11).to(memory_format=layout).requires_grad_(True)
    fused = _conv_results(layer, x, layer)
    composed = _conv_results(layer, x, lambda x: composed_forward(layer, x))
    assert type(layer(x).grad_fn).__name__ == "_Conv2dWithLowRankBackward"
    for ours, reference in zip(fused, composed, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_fused_conv_node_skips_the_input_gradient_nothing_needs() -> None:
    layer = LoRAConv2d(CONVS["7x7 stem, stride 2"](), rank=3)
    randomize_adapters(layer)
    x = torch.randn(2, 3, 16, 16)
    fused = _conv_results(layer, x, layer)
    composed = _conv_results(layer, x, lambda x: composed_forward(layer, x))
    assert fused[1] is None
    for ours, reference in zip(fused[2:], composed[2:], strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("make", "node"),
    [
        (lambda: LoRAConv2d(CONVS["3x3"](), rank=3, dropout=0.5).train(), False),
        (lambda: LoRAConv2d(CONVS["3x3"](), rank=3, dropout=0.5).eval(), True),
        (lambda: LoRAConv2d(nn.Conv2d(8, 16, 4, padding="same"), rank=3), False),
        (lambda: LoRAConv2d(CONVS["3x3"](), rank=3, dora=True), False),
    ],
    ids=["dropout in training", "dropout in eval", "uneven same padding", "DoRA"],
)
@pytest.mark.parametrize("shape", [(2, 8, 9, 9), (8, 9, 9)], ids=["batch", "one unbatched image"])
def test_conv_layers_the_node_cannot_compute_take_the_composed_path(make, node: bool, shape) -> None:
    layer = make()
    randomize_adapters(layer)
    node = node and len(shape) == 4
    x = torch.randn(*shape, requires_grad=True)
    torch.manual_seed(1)  # the same dropout mask for both
    out = layer(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, composed_forward(layer, x), atol=1e-5, rtol=1e-5)
    assert (type(out.grad_fn).__name__ == "_Conv2dWithLowRankBackward") == node


@pytest.mark.parametrize(("kind", "node"), [("3x3", True), ("depthwise", False)])
def test_conv_under_bf16_autocast_matches_the_composed_ops(kind: str, node: bool) -> None:
    layer = LoRAConv2d(CONVS[kind](), rank=3)
    randomize_adapters(layer, std=0.5)
    x = torch.randn(2, 8, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, composed = layer(x), composed_forward(layer, x)
    # A grouped conv would fold its update into a bf16 kernel, rounding it away: it keeps the composed path.
    assert (type(fused.grad_fn).__name__ == "_Conv2dWithLowRankBackward") == node
    assert fused.dtype == composed.dtype == torch.bfloat16
    torch.testing.assert_close(fused, composed, atol=0.1, rtol=0.02)
    fused.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_fused_conv_node_refuses_a_trainable_base_weight() -> None:
    layer = LoRAConv2d(CONVS["3x3"](), rank=2)
    layer.base.weight.requires_grad_(True)
    layer(torch.randn(2, 8, 6, 6)).sum().backward()
    assert layer.base.weight.grad is not None
    with pytest.raises(ValueError, match="frozen"):
        fused_conv.conv2d_with_low_rank(
            torch.randn(1, 8, 6, 6),
            layer.base.weight,
            None,
            layer.lora_A,
            layer.lora_B,
            1.0,
            ((1, 1), (1, 1), (1, 1), 1),
        )
