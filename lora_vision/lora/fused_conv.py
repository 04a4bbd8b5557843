"""One autograd node for a frozen Conv2d plus its low-rank update, the training hot path of LoRA on CNNs.

    y = conv(x, W) + bias + scale * B conv(x, A)  =  conv(x, W + scale * B A) + bias

A (r, in/groups, kh, kw) runs with the base conv's geometry, B (out, r) is a 1x1 map of its r channels. Written by
hand rather than composed from torch ops (conv A, a scale, a 1x1 conv B, an add: what PEFT runs) because the
composition pays for work the math does not need: a second output-sized tensor and a pass to add it, two small
convolutions whose backward computes input gradients separately, and the same again in the backward pass. Here:
- A is always one convolution with r output channels; h = A x is kept for dB (r / out of the output's size).
- With many output positions per weight element (the early, high-resolution stages), the update is folded into
  the kernel for the call: W' = W + scale * B A costs one small GEMM over W, and the forward pass is the frozen
  conv alone. Otherwise (late stages, few positions) scale * B h is added into the output in place as one GEMM,
  with no output-sized temporary. The backward pass makes the same choice for the input gradient: the transposed
  conv with W', or with W plus A's own input gradient.
- Grouped and depthwise convs always fold: B h would need groups * r channels (r per input channel of a depthwise
  conv), while the weight gradient of W' (one conv's work) gives dA = scale B^T dW' and dB = scale dW' A^T.
- Only what the backward pass reads is saved: x (which the layer before keeps anyway), h, and the factors.
Float32 only for folding: in bf16/fp16, W' would round away every update below half an ulp of W.
Measured with `python -m lora_vision.bench` (experiments/benchmarks/).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable


class ConvGeometry(NamedTuple):
    """Stride, explicit zero padding, dilation and groups of a convolution (padding already applied to x is not
    in it)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


def padded_input(base: nn.Conv2d, x: Tensor) -> tuple[Tensor, ConvGeometry] | None:
    """`x` padded as `base` pads it before its convolution, and the geometry that convolution then runs with;
    None where `base` computes something the node does not reproduce (a subclass with its own forward)."""
    stride, dilation, groups = tuple(base.stride), tuple(base.dilation), base.groups
    if type(base).forward is nn.Conv2d.forward:
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            return x, ConvGeometry(stride, (0, 0), dilation, groups)
        if isinstance(base.padding, str):  # "same" or "valid": explicit only where it is symmetric
            if base.padding == "valid":
                return x, ConvGeometry(stride, (0, 0), dilation, groups)
            total = [d * (k - 1) for d, k in zip(dilation, base.kernel_size, strict=True)]
            if any(t % 2 for t in total):
                return None
            return x, ConvGeometry(stride, tuple(t // 2 for t in total), dilation, groups)
        return x, ConvGeometry(stride, tuple(base.padding), dilation, groups)
    # timm's TensorFlow-style "same" convs pad the input at run time, then convolve unpadded. Looked up only when
    # timm is loaded: no such conv exists otherwise, and the LoRA core does not depend on timm.
    timm_layers = sys.modules.get("timm.layers")
    if timm_layers is not None and type(base).forward is timm_layers.Conv2dSame.forward:
        x = timm_layers.pad_same(x, base.weight.shape[-2:], stride, dilation)
        return x, ConvGeometry(stride, (0, 0), dilation, groups)
    return None


def _updated_kernel(weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """W + scale * B A (a new tensor; W is untouched)."""
    return torch.addmm(weight.flatten(1), b, a.flatten(1), alpha=scale).view_as(weight)


def _conv_backward(
    grad: Tensor, x: Tensor, kernel: Tensor, geometry: ConvGeometry, input_grad: bool, weight_grad: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The input and/or kernel gradient of conv(x, kernel) for the output gradient `grad`."""
    stride, padding, dilation, groups = geometry
    grad_x, grad_kernel, _ = torch.ops.aten.convolution_backward(
        grad, x, kernel, None, stride, padding, dilation, False, (0, 0), groups, (input_grad, weight_grad, False)
    )
    return grad_x, grad_kernel


# Pointwise (1x1) maps as GEMMs on the layout a tensor is in, so that nothing is transposed or copied: a
# channels-last (N, C, H, W) tensor is a (positions, C) matrix, a contiguous one N (C, positions) matrices.


def _is_channels_last(t: Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _positions_by_channels(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _add_pointwise_(out: Tensor, b: Tensor, h: Tensor, alpha: float) -> None:
    """out += alpha * B h, in place (out: (N, out, H, W) contiguous or channels-last)."""
    if _is_channels_last(out):
        _positions_by_channels(out).addmm_(_positions_by_channels(h), b.t(), alpha=alpha)
    else:
        n, channels = out.shape[:2]
        out.view(n, channels, -1).baddbmm_(b.expand(n, -1, -1), h.reshape(n, b.shape[1], -1), alpha=alpha)


def _pointwise_transposed(g: Tensor, b: Tensor, alpha: float) -> Tensor:
    """alpha * B^T g: the (N, r, H, W) gradient of h, in g's layout."""
    n, _, height, width = g.shape
    if _is_channels_last(g):
        rows = torch.mm(_positions_by_channels(g), b).mul_(alpha)
        return rows.view(n, height, width, -1).permute(0, 3, 1, 2)
    # bmm with B^T broadcast over the samples; torch.matmul would fold the samples into one GEMM by copying g.
    grad_h = torch.bmm(b.t().expand(n, -1, -1), g.reshape(n, g.shape[1], -1))
    return grad_h.mul_(alpha).view(n, -1, height, width)


def _pointwise_weight_grad(g: Tensor, h: Tensor, alpha: float) -> Tensor:
    """alpha * sum over samples and positions of g h^T: the (out, r) gradient of B."""
    if _is_channels_last(g):
        return torch.mm(_positions_by_channels(g).t(), _positions_by_channels(h)).mul_(alpha)
    n = g.shape[0]
    per_sample = torch.bmm(g.reshape(n, g.shape[1], -1), h.reshape(n, h.shape[1], -1).transpose(1, 2))
    return per_sample.sum(0).mul_(alpha)


def _fold(x: Tensor, weight: Tensor, out_positions: int) -> tuple[bool, bool]:
    """(fold in the forward pass, fold for the input gradient) of a groups == 1 conv.

    Forward: B h costs positions * out * r multiply-adds, W' costs out * fan_in * r, so fold when there are more
    output positions (over the batch) than the kernel has inputs per output channel, i.e. when W' is smaller than
    the output. Input gradient: A's transposed conv costs positions * fan_in * r plus a pass to add its result,
    W' again out * fan_in * r, so fold when there are more positions than output channels, and W' is no larger
    than the input-sized gradient A's path would allocate instead (a step's peak memory sits early in the backward
    pass, where the late stages' kernels are larger than their inputs: 3x in ResNet-50's third stage at batch 4).
    """
    return out_positions >= weight[0].numel(), out_positions >= weight.shape[0] and weight.numel() <= x.numel()


class _Conv2dWithLowRank(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        scale: float,
        geometry: ConvGeometry,
        may_fold: bool,
    ) -> Tensor:
        stride, padding, dilation, groups = geometry
        ctx.scale, ctx.geometry = scale, geometry
        if groups > 1:
            out = F.conv2d(x, _updated_kernel(weight, a, b, scale), bias, stride, padding, dilation, groups)
            ctx.save_for_backward(x, weight, a, b)
            return out
        h = F.conv2d(x, a, None, stride, padding, dilation)
        positions = h.shape[0] * h.shape[2] * h.shape[3]
        fold_forward, ctx.fold_backward = _fold(x, weight, positions) if may_fold else (False, False)
        if fold_forward:
            out = F.conv2d(x, _updated_kernel(weight, a, b, scale), bias, stride, padding, dilation)
        else:
            out = F.conv2d(x, weight, bias, stride, padding, dilation)
            _add_pointwise_(out, b, h, scale)
        ctx.save_for_backward(x, weight, a, b, h)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        scale, geometry = ctx.scale, ctx.geometry
        input_grad = ctx.needs_input_grad[0]
        if geometry.groups > 1:
            x, weight, a, b = ctx.saved_tensors
            grad_x, grad_kernel = _conv_backward(
                grad, x, _updated_kernel(weight, a, b, scale), geometry, input_grad, True
            )
            grad_kernel = grad_kernel.flatten(1)
            grad_a = torch.mm(b.t(), grad_kernel).mul_(scale).view_as(a)
            grad_b = torch.mm(grad_kernel, a.flatten(1).t()).mul_(scale)
            return grad_x, None, None, grad_a, grad_b, None, None, None
        x, weight, a, b, h = ctx.saved_tensors
        grad_b = _pointwise_weight_grad(grad, h, scale)
        grad_h = _pointwise_transposed(grad, b, scale)
        if not input_grad:
            _, grad_a = _conv_backward(grad_h, x, a, geometry, False, True)
            return None, None, None, grad_a, grad_b, None, None, None
        if ctx.fold_backward:
            _, grad_a = _conv_backward(grad_h, x, a, geometry, False, True)
            grad_x, _ = _conv_backward(grad, x, _updated_kernel(weight, a, b, scale), geometry, True, False)
        else:
            grad_x_low_rank, grad_a = _conv_backward(grad_h, x, a, geometry, True, True)
            grad_x, _ = _conv_backward(grad, x, weight, geometry, True, False)
            grad_x.add_(grad_x_low_rank)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def conv2d_with_low_rank(
    x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, geometry: ConvGeometry
) -> Tensor:
    """`F.conv2d(x, weight, bias, *geometry)` plus scale * B conv(x, A): a (r, in/groups, kh, kw), b (out, r).

    weight and bias must not require gradients: the node computes none for them. Under autocast everything is cast
    to the autocast dtype first, as `F.conv2d` would be, and the node runs in that dtype; gradients flow back
    through the casts. A grouped conv needs float32 (it always folds the update into the kernel).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("conv2d_with_low_rank trains only the low-rank factors; the base weight and bias are frozen")
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    may_fold = torch.finfo(dtype).bits >= 32
    if geometry.groups > 1 and not may_fold:
        raise ValueError(f"conv2d_with_low_rank folds a grouped conv's update into its kernel, which {dtype} rounds")
    if autocast:
        x, weight, a, b = (t.to(dtype) for t in (x, weight, a, b))
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        return _Conv2dWithLowRank.apply(x, weight, bias, a, b, scale, geometry, may_fold)


def low_precision(x: Tensor) -> bool:
    """Whether a conv of `x` runs below float32 here (its dtype, or autocast's)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.finfo(torch.get_autocast_dtype(device)).bits < 32
    return torch.finfo(x.dtype).bits < 32
