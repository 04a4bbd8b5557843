"""Where a training step's time goes, op by op, for each side of a benchmark row (torch.profiler).

`python -m lora_vision.bench.profile [--configs GLOB ...] [--steps N] [--rows N]`

Profiles `--steps` training steps of every side (ours, PEFT, the floor and, where the row has it, the composed
ops) after one warm-up step, and prints per side the ops that took the most self CPU time with their call
counts, and the step's total. The difference between two sides' tables is what one implementation runs that the
other does not: extra convolutions and their gradients, elementwise passes, layout copies.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence

from torch.profiler import ProfilerActivity, profile

from lora_vision.bench.configs import Settings, positive_int, select_lora_configs
from lora_vision.bench.peft_side import peft_version
from lora_vision.bench.sides import TrainStep, build_base, make_batch, prepare_side, sides_of


def profile_side(step: TrainStep, steps: int) -> list[tuple[str, float, int]]:
    """(op, self CPU ms per step, calls per step) of `steps` profiled calls of `step`, most expensive first."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in events]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_vision.bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["resnet50/conv3x3"], metavar="GLOB")
    parser.add_argument("--steps", type=positive_int, default=3, help="profiled steps per side (default 3)")
    parser.add_argument("--rows", type=positive_int, default=12, help="ops shown per side (default 12)")
    parser.add_argument("--quick", action="store_true", help="tiny models (for tests)")
    args = parser.parse_args(argv)
    settings = Settings(quick=args.quick)
    configs = select_lora_configs(args.configs)
    for config in configs:
        spec = settings.model(config)
        base = build_base(spec, settings)
        images, labels = make_batch(spec, settings)
        for side in sides_of(config, with_peft=peft_version() is not None):
            model = prepare_side(copy.deepcopy(base), config, side, settings)
            ops = profile_side(TrainStep(model, images, labels, settings), args.steps)
            total = sum(ms for _, ms, _ in ops)
            print(f"\n{config.name}, {side}: {total:.1f} ms self CPU time per step ({spec.label}, batch {len(images)})")
            print("| op | ms per step | calls per step |\n|---|---|---|")
            for name, ms, calls in ops[: args.rows]:
                print(f"| {name} | {ms:.1f} | {calls} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
