"""One autograd node for a frozen Linear plus its low-rank update, the training hot path of LoRA on ViTs.

    y = x W^T + bias + scale * (x_d A_s^T) B_s^T  in the output columns of each adapted slot s

Written by hand rather than composed from torch ops because the composition costs what the LoRA math does not:
composed, the update is a second branch (A, B, an add; for q/v slices of a fused qkv layer also an `index_add`,
whose backward keeps a (tokens, slots, out_s) gradient alive, and einsum copies), and its backward adds another
input-gradient GEMM and another add. Here:
- with many tokens per weight element (training batches) and float32, the update is folded into the weight for the
  call: W' = W + scale * B A costs a pass over W, independent of the batch, and the forward is then the frozen
  layer's single GEMM. Only x is saved; h = A x is recomputed in the backward pass.
- otherwise (few tokens, where building W' costs more than it saves; dropout, where the two paths see different
  inputs; bf16/fp16, where W' would round away every update below half an ulp of W, i.e. all of them early in
  training) scale * B (A x) is added into the slot's output columns in place (`addmm_` on a strided view).
- the backward pass computes the input gradient once (g W, then `addmm_` of dh A into it) and dA, dB with one GEMM
  each per slot.
Only the adapter factors receive gradients; the base layer is frozen by construction of LoRALayer. Measured with
`python -m lora_vision.bench` (experiments/benchmarks/).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def _updated_weight(weight: Tensor, a: Tensor, b: Tensor, scale: float, slots: Sequence[int]) -> Tensor:
    """W + scale * B_s A_s in each adapted slot's rows (a new tensor; W is untouched)."""
    merged = weight.clone()
    slot_out = b.shape[1]
    for i, slot in enumerate(slots):
        merged[slot * slot_out : (slot + 1) * slot_out].addmm_(b[i], a[i], alpha=scale)
    return merged


def _mm_bias(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


class _LinearWithLowRank(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        x_dropped: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        scale: float,
        slots: Sequence[int],
        fold: bool,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if x_dropped is None else x_dropped.reshape(-1, x.shape[-1])
        if fold:
            out = _mm_bias(x2, _updated_weight(weight, a, b, scale, slots), bias)
            ctx.save_for_backward(xd2, weight, a, b)
        else:
            out = _mm_bias(x2, weight, bias)
            h = torch.mm(xd2, a.flatten(0, 1).t())
            rank, slot_out = a.shape[1], b.shape[1]
            for i, slot in enumerate(slots):
                columns = out[:, slot * slot_out : (slot + 1) * slot_out]
                columns.addmm_(h[:, i * rank : (i + 1) * rank], b[i].t(), alpha=scale)
            ctx.save_for_backward(xd2, weight, a, b, h)
        ctx.scale, ctx.slots, ctx.fold, ctx.dropped = scale, tuple(slots), fold, x_dropped is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.fold:
            xd2, weight, a, b = ctx.saved_tensors
            h = torch.mm(xd2, a.flatten(0, 1).t())
        else:
            xd2, weight, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        rank, slot_out, scale, slots = a.shape[1], b.shape[1], ctx.scale, ctx.slots
        g_slots = [g[:, slot * slot_out : (slot + 1) * slot_out] for slot in slots]
        # dh = scale * g_s B_s, concatenated over slots to (tokens, slots * rank): one GEMM then gives dA for all.
        dh = torch.cat([torch.mm(g_s, b[i]) for i, g_s in enumerate(g_slots)], dim=1).mul_(scale)
        grad_a = torch.mm(dh.t(), xd2).view_as(a) if ctx.needs_input_grad[4] else None
        grad_b = None
        if ctx.needs_input_grad[5]:
            # (h_s^T g_s)^T rather than g_s^T h_s: the same product, but BLAS runs the (r, tokens) x (tokens, out)
            # shape about twice as fast as (out, tokens) x (tokens, r) for small r.
            h_slots = [h[:, i * rank : (i + 1) * rank] for i in range(len(slots))]
            grad_b = torch.stack([torch.mm(h_s.t(), g_s).t() for g_s, h_s in zip(g_slots, h_slots, strict=True)])
            grad_b.mul_(scale)
        shape = (*grad.shape[:-1], weight.shape[1])
        grad_x = grad_x_dropped = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight)
            if not ctx.dropped:
                grad_x.addmm_(dh, a.flatten(0, 1))
            grad_x = grad_x.view(shape)
        if ctx.needs_input_grad[1]:
            grad_x_dropped = torch.mm(dh, a.flatten(0, 1)).view(shape)
        return grad_x, grad_x_dropped, None, None, grad_a, grad_b, None, None, None


def linear_with_low_rank(
    x: Tensor,
    x_dropped: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    scale: float,
    slots: Sequence[int],
) -> Tensor:
    """`F.linear(x, weight, bias)` plus, for each adapted slot s, scale * B[i] A[i] x_dropped in slot s's columns.

    a: (len(slots), r, in), b: (len(slots), out_s, r), slot s owning output columns [s * out_s, (s + 1) * out_s).
    `x_dropped` is `x` itself when there is no dropout. weight and bias must not require gradients: the node
    computes none for them. Under autocast everything is cast to the autocast dtype first, as `F.linear` would be,
    and the node runs in that dtype; gradients flow back through the casts.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_with_low_rank trains only the low-rank factors; the base weight and bias are frozen")
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    shared = x_dropped is x
    # Folding costs passes over W (out * in), not folding costs rank-r products over the tokens (tokens * (in +
    # out) per rank); on ViT-B/16 qkv shapes on a CPU the two broke even near tokens * (in + out) = in * out, about
    # one 224 px image: below it the in-place addition is cheaper, from two images up folding is.
    tokens = x.numel() // x.shape[-1]
    fold = shared and torch.finfo(dtype).bits >= 32 and tokens * sum(weight.shape) >= weight.numel()
    if autocast:
        x, x_dropped, weight, a, b = (t.to(dtype) for t in (x, x_dropped, weight, a, b))
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        separate = None if shared else x_dropped
        return _LinearWithLowRank.apply(x, separate, weight, bias, a, b, scale, tuple(slots), fold)
