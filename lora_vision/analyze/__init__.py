"""What did the adapters learn, and which rank was actually needed?

`layer_spectra` gives the singular values of every adapter's update (exactly, via its low-rank factors), the
effective rank at energy thresholds and the update's size relative to the frozen weight. `truncate_adapters`
replaces every update by its best rank-k approximation, and `evaluate_truncations` measures accuracy against k.
`python -m lora_vision.analyze SOURCE` runs both on a trained run or saved adapter and writes `spectra.*` and
`truncation.*` (CSV, Markdown, PNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lora_vision.analyze.plot import plot_spectra, plot_truncation
from lora_vision.analyze.spectra import (
    DEFAULT_THRESHOLDS,
    SpectrumRow,
    effective_rank,
    layer_spectra,
    low_rank_svd,
)
from lora_vision.analyze.table import spectra_csv, spectra_markdown, truncation_csv, truncation_markdown
from lora_vision.analyze.truncate import (
    TruncationRow,
    default_ranks,
    evaluate_truncations,
    retained_energy,
    smallest_sufficient_rank,
    trained_rank,
    truncate_adapters,
)
from lora_vision.results import write_atomic


def write_spectra(rows: Sequence[SpectrumRow], out_dir: str | Path, title: str | None = None) -> list[Path]:
    """Write `spectra.csv`, `spectra.md` and `spectra.png` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    return [
        write_atomic(out / "spectra.csv", spectra_csv(rows)),
        write_atomic(out / "spectra.md", spectra_markdown(rows)),
        plot_spectra(rows, out / "spectra.png", title),
    ]


def write_truncation(rows: Sequence[TruncationRow], out_dir: str | Path, title: str | None = None) -> list[Path]:
    """Write `truncation.csv`, `truncation.md` and `truncation.png` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    return [
        write_atomic(out / "truncation.csv", truncation_csv(rows)),
        write_atomic(out / "truncation.md", truncation_markdown(rows)),
        plot_truncation(rows, out / "truncation.png", title=title),
    ]


__all__ = [
    "DEFAULT_THRESHOLDS",
    "SpectrumRow",
    "TruncationRow",
    "default_ranks",
    "effective_rank",
    "evaluate_truncations",
    "layer_spectra",
    "low_rank_svd",
    "retained_energy",
    "smallest_sufficient_rank",
    "trained_rank",
    "truncate_adapters",
    "write_spectra",
    "write_truncation",
]
