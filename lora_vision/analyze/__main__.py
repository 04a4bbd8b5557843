"""What the adapters of a run learned, and which rank they needed.

    python -m lora_vision.analyze SOURCE [--out DIR] [--ranks 1,2,4] [--thresholds 0.9,0.99] [--no-eval]
        [--split test|val] [--checkpoint BASE_WEIGHTS] [--batch-size N] [--num-workers N] [--device auto|cpu|cuda]
        [--limit-batches N] [data=NAME] [data.KEY=VALUE]

SOURCE is a training run directory or an adapter directory or file. Writes `spectra.{csv,md,png}` (per-layer
singular values, effective rank, update size relative to the frozen weight) and, unless `--no-eval`,
`truncation.{csv,md,png}` (accuracy with every adapter truncated to rank k) into DIR (default:
`<source dir>/analysis/`). The data options are those of `python -m lora_vision.evaluate`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from lora_vision.analyze import (
    DEFAULT_THRESHOLDS,
    SpectrumRow,
    TruncationRow,
    default_ranks,
    evaluate_truncations,
    layer_spectra,
    smallest_sufficient_rank,
    trained_rank,
    write_spectra,
    write_truncation,
)
from lora_vision.analyze.table import threshold_label
from lora_vision.errors import user_errors_as_messages
from lora_vision.evaluate import (
    EvaluationError,
    Loaded,
    add_eval_arguments,
    build_eval_datamodule,
    evaluate_model,
    load_source,
    locate_source,
    resolve_device,
    select_data,
)

# "Within half a point of the full adapters" decides which rank was needed.
TOLERANCE = 0.005


def _number_list(kind: Callable[[str], float], check: Callable[[float], bool], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",")]
        except ValueError:
            values = []
        if not values or not all(check(v) for v in values):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_vision.analyze",
        description="Spectra of a run's LoRA updates and accuracy after post-hoc rank truncation.",
    )
    add_eval_arguments(parser)
    parser.add_argument("--out", type=Path, help="output directory (default: <source dir>/analysis)")
    parser.add_argument(
        "--ranks",
        type=_number_list(int, lambda k: k >= 1, "integers >= 1"),
        help="truncation ranks to evaluate, e.g. 1,2,4 (default: powers of two below the trained rank, and it)",
    )
    parser.add_argument(
        "--thresholds",
        type=_number_list(float, lambda t: 0 < t <= 1, "numbers in (0, 1]"),
        default=list(DEFAULT_THRESHOLDS),
        help="energy shares for the effective rank (default: 0.9,0.99)",
    )
    parser.add_argument("--no-eval", action="store_true", help="spectra only: load no data, evaluate nothing")
    return parser


def _spectra_summary(rows: Sequence[SpectrumRow]) -> str:
    thresholds = list(rows[0].effective_ranks)
    header = ("layer", "slot", "rank", "|dW|/|W0|", *(f"r@{threshold_label(t)}%" for t in thresholds))
    table = [header] + [
        (
            row.layer,
            row.slot,
            str(row.rank),
            f"{row.relative_norm:.4f}",
            *(str(row.effective_ranks[t]) for t in thresholds),
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        for cells in table
    )


def _truncation_summary(rows: Sequence[TruncationRow]) -> str:
    lines = [f"{row.label:>9}  k={row.k:<3}  acc1 {row.metrics['acc1']:.2%}" for row in rows]
    needed = smallest_sufficient_rank(rows, tolerance=TOLERANCE)
    lines.append(f"smallest k within {100 * TOLERANCE:g} pt of the full adapters' top-1: {needed}")
    return "\n".join(lines)


def _truncation(args: argparse.Namespace, loaded: Loaded, spectra: Sequence[SpectrumRow]) -> list[TruncationRow]:
    device = resolve_device(args.device)
    data = build_eval_datamodule(args, loaded)
    loader = data.dataloader()
    ranks = args.ranks or default_ranks(trained_rank(loaded.model))
    return evaluate_truncations(
        loaded.model,
        ranks,
        lambda model: evaluate_model(
            model, loader, loaded.num_classes, device, args.limit_batches, data.datamodule.batch_transform
        ),
        spectra=spectra,
    )


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the analysis; returns the files written."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    with user_errors_as_messages(parser.prog):
        source = locate_source(args.source)
        if source.kind == "merged":
            raise EvaluationError(f"{source.path} is a merged export, which has no adapters left to analyse")
        if not args.no_eval:
            # Data errors (unknown option or key, no recorded data) surface before the model is built.
            resolve_device(args.device)
            select_data(args.overrides, source.data_cfg, source.image_size)
        loaded = load_source(source, args.checkpoint)
        spectra = layer_spectra(loaded.model, args.thresholds)
        if not spectra:
            raise EvaluationError(f"{source.path} holds no LoRA adapters (a linear probe or full fine-tuning run?)")
        out = args.out or source.home / "analysis"
        title = f"{loaded.model_name}: {source.home.name}"
        written = write_spectra(spectra, out, title)
        print(_spectra_summary(spectra))
        if not args.no_eval:
            truncation = _truncation(args, loaded, spectra)
            written += write_truncation(truncation, out, title)
            print(_truncation_summary(truncation))
    print("wrote " + ", ".join(map(str, written)))
    return written


if __name__ == "__main__":
    main()
