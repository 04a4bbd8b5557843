"""Command line: ``python -m lora_vision.bench [--device cpu|cuda] [--quick] [--configs GLOB ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from lora_vision.bench.configs import (
    CONFIGS,
    OPTIONS,
    PRECISIONS,
    Settings,
    non_negative_int,
    positive_int,
    select_configs,
    select_options,
    settings_from,
)
from lora_vision.bench.report import markdown, measured, write_record
from lora_vision.bench.run import run_benchmark


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_vision.bench",
        description="Time LoRA training steps against their floor and against PEFT; write results.md/.csv/.json.",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 runs under autocast")
    parser.add_argument("--batch-size", type=positive_int, help="one batch size for every model (default: per model)")
    parser.add_argument("--steps", type=positive_int, help="training steps per timed sample (default 1)")
    parser.add_argument("--repeats", type=positive_int, help="timed rounds, in rotating order (default 5)")
    parser.add_argument("--warmup", type=non_negative_int, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--runs", type=positive_int, help="runs of every comparison, each with warm-up and rounds (default 3)"
    )
    parser.add_argument(
        "--configs", nargs="+", metavar="GLOB", help=f"configurations to run (default all): {CONFIGS[0].name}, ..."
    )
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--out", help="directory for results.md, results.csv and results.json")
    parser.add_argument("--quick", action="store_true", help="tiny models; 1 run: 1 warm-up, 2 timed rounds (tests)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory children")
    parser.add_argument("--no-inference", dest="inference", action="store_false", help="skip inference timings")
    parser.add_argument(
        "--options",
        nargs="*",
        default=list(OPTIONS),
        metavar="OPTION",
        help=f"speed/memory options to time against their configuration (default all: {', '.join(OPTIONS)}); "
        "rows run only when their configuration is selected; none with an empty list",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.list:
        print("\n".join(config.name for config in CONFIGS))
        return 0
    # Quick runs compile with aot_eager: traced like inductor, without its minute of C++ compilation.
    quick = Settings(warmup=1, repeats=2, runs=1, compile_backend="aot_eager")
    settings = settings_from(args, quick, inference=args.inference)
    if torch.device(settings.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    try:
        configs = select_configs(args.configs)
        options = select_options(configs, args.options)
    except ValueError as err:
        raise SystemExit(str(err)) from None

    def run() -> dict[str, Any]:
        rows, option_rows = run_benchmark(configs, settings, options)
        return {"rows": rows, "option_rows": option_rows}

    record = measured("lora_vision.bench", argv, settings, run)
    if args.out:
        for path in write_record(args.out, record):
            print(f"wrote {path}")
    else:
        print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
