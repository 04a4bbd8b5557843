"""Throughput of a LoRA layer's rank-r matrix products next to the layer's own, on this machine.

`python -m lora_vision.bench.rank_gemms [--tokens N --in-features I --out-features O --rank R --threads T]`
`python -m lora_vision.bench.rank_gemms --conv [--batch N --channels C --size S --rank R --threads T]`

Why ours/floor stays above the FLOP-ideal ratio in `results.md`: the products LoRA adds, (tokens x in) x (in x r)
and its relatives, run at a fraction of the BLAS throughput of the layer's square (tokens x in) x (in x out)
product, so their small share of the FLOPs costs a larger share of the time. It also shows why the fused node
computes dB as (h^T g)^T rather than g^T h. Defaults: ViT-S/16's qkv layer at batch 8, rank 8.

`--conv` does the same for a 3x3 convolution (C -> C channels on S x S, padding 1) and the convolutions of its
LoRA step, as the fused conv node runs them: A (C -> r, 3x3) forward and kernel gradient, A's input gradient, and
the pointwise products of B. Defaults: ResNet-50's first stage at batch 4, rank 8.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def measure(tokens: int, in_features: int, out_features: int, rank: int, repeats: int = 20) -> list[dict]:
    """Median time and GFLOP/s of the layer's product and of each rank-r product of its LoRA step."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    a = torch.randn(rank, in_features, generator=generator)
    b = torch.randn(out_features, rank, generator=generator)
    g = torch.randn(tokens, out_features, generator=generator)
    h, dh = x @ a.t(), g @ b
    products = {
        "layer: x W^T (tokens x in x out)": (lambda: x @ weight.t(), tokens * in_features * out_features),
        "h = x A^T": (lambda: x @ a.t(), tokens * in_features * rank),
        "dh = g B": (lambda: g @ b, tokens * out_features * rank),
        "dA = dh^T x": (lambda: dh.t() @ x, tokens * in_features * rank),
        "dB = g^T h": (lambda: g.t() @ h, tokens * out_features * rank),
        "dB = (h^T g)^T": (lambda: (h.t() @ g).t(), tokens * out_features * rank),
    }
    rows = []
    for name, (fn, multiply_adds) in products.items():
        seconds = _median_seconds(fn, repeats)
        rows.append({"product": name, "ms": seconds * 1e3, "gflops": 2 * multiply_adds / seconds / 1e9})
    return rows


def measure_conv(batch: int, channels: int, size: int, rank: int, repeats: int = 20) -> list[dict]:
    """Median time and GFLOP/s of a 3x3 conv's forward and input gradient, and of each rank-r product of its LoRA
    step (the conv node's own calls)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator)
    weight = torch.randn(channels, channels, 3, 3, generator=generator)
    a = torch.randn(rank, channels, 3, 3, generator=generator)
    b = torch.randn(channels, rank, generator=generator)
    g = torch.randn(batch, channels, size, size, generator=generator)
    dh = torch.randn(batch, rank, size, size, generator=generator)
    positions = batch * size * size

    def backward(grad: torch.Tensor, kernel: torch.Tensor, mask: tuple[bool, bool, bool]) -> object:
        return torch.ops.aten.convolution_backward(
            grad, x, kernel, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, mask
        )

    products = {
        "layer: conv(x, W)": (lambda: F.conv2d(x, weight, padding=1), positions * channels * channels * 9),
        "layer: input gradient": (lambda: backward(g, weight, (True, False, False)), positions * channels**2 * 9),
        "h = conv(x, A)": (lambda: F.conv2d(x, a, padding=1), positions * rank * channels * 9),
        "dA: kernel gradient of A": (lambda: backward(dh, a, (False, True, False)), positions * rank * channels * 9),
        "input gradient of A": (lambda: backward(dh, a, (True, False, False)), positions * rank * channels * 9),
        "B h added into the output": (
            lambda: g.view(batch, channels, -1).baddbmm_(b.expand(batch, -1, -1), dh.view(batch, rank, -1)),
            positions * channels * rank,
        ),
        "W' = W + B A": (lambda: torch.addmm(weight.flatten(1), b, a.flatten(1)), channels * channels * 9 * rank),
    }
    rows = []
    for name, (fn, multiply_adds) in products.items():
        seconds = _median_seconds(fn, repeats)
        rows.append({"product": name, "ms": seconds * 1e3, "gflops": 2 * multiply_adds / seconds / 1e9})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_vision.bench.rank_gemms", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8 * 197, help="rows: batch x tokens (default 1576)")
    parser.add_argument("--in-features", type=int, default=384)
    parser.add_argument("--out-features", type=int, default=1152)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--conv", action="store_true", help="a 3x3 conv layer instead of a Linear")
    parser.add_argument("--batch", type=int, default=4, help="--conv: images (default 4)")
    parser.add_argument("--channels", type=int, default=64, help="--conv: in = out channels (default 64)")
    parser.add_argument("--size", type=int, default=56, help="--conv: height = width (default 56)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.conv:
        rows = measure_conv(args.batch, args.channels, args.size, args.rank, args.repeats)
        shape = f"batch {args.batch}, {args.channels} channels, {args.size}x{args.size}, 3x3, rank {args.rank}"
    else:
        rows = measure(args.tokens, args.in_features, args.out_features, args.rank, args.repeats)
        shape = f"tokens {args.tokens}, in {args.in_features}, out {args.out_features}, rank {args.rank}"
    print(f"{torch.get_num_threads()} torch thread(s); {shape}")
    print("| product | ms | GFLOP/s |\n|---|---|---|")
    for row in rows:
        print(f"| {row['product']} | {row['ms']:.3f} | {row['gflops']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
