"""Throughput of a LoRA layer's rank-r matrix products next to the layer's own, on this machine.

`python -m lora_vision.bench.rank_gemms [--tokens N --in-features I --out-features O --rank R --threads T]`

Why ours/floor stays above the FLOP-ideal ratio in `results.md`: the products LoRA adds, (tokens x in) x (in x r)
and its relatives, run at a fraction of the BLAS throughput of the layer's square (tokens x in) x (in x out)
product, so their small share of the FLOPs costs a larger share of the time. It also shows why the fused node
computes dB as (h^T g)^T rather than g^T h. Defaults: ViT-S/16's qkv layer at batch 8, rank 8.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_vision.bench.rank_gemms", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8 * 197, help="rows: batch x tokens (default 1576)")
    parser.add_argument("--in-features", type=int, default=384)
    parser.add_argument("--out-features", type=int, default=1152)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.tokens, args.in_features, args.out_features, args.rank, args.repeats)
    print(
        f"{torch.get_num_threads()} torch thread(s); tokens {args.tokens}, in {args.in_features}, "
        f"out {args.out_features}, rank {args.rank}"
    )
    print("| product | ms | GFLOP/s |\n|---|---|---|")
    for row in rows:
        print(f"| {row['product']} | {row['ms']:.3f} | {row['gflops']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
