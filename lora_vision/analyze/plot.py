"""The analysis plots: per-layer spectra with effective rank by depth, and accuracy against truncation rank."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # analyses run on headless machines (clusters, CI)
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lora_vision.analyze.spectra import SpectrumRow
from lora_vision.analyze.table import threshold_label
from lora_vision.analyze.truncate import TruncationRow
from lora_vision.results import write_atomic

_LINE_STYLES = ("-", "--", ":", "-.")


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    png = io.BytesIO()
    # No timestamp or version in the file: the same rows give byte-identical PNGs.
    fig.savefig(png, format="png", metadata={"Software": None})
    plt.close(fig)
    return write_atomic(path, png.getvalue())


def _spectrum_panel(ax: plt.Axes, rows: Sequence[SpectrumRow]) -> None:
    blocks = [row.block for row in rows if row.block is not None]
    depth = plt.get_cmap("viridis")
    low, high = min(blocks, default=0), max(blocks, default=0)
    slots = list(dict.fromkeys(row.slot for row in rows))
    for row in rows:
        top = row.singular_values[0] if row.singular_values else 0.0
        if not top:
            continue
        # Colour says depth, line style the slot, so q and v of one block sit side by side.
        color = "0.5" if row.block is None else depth((row.block - low) / max(high - low, 1))
        style = _LINE_STYLES[slots.index(row.slot) % len(_LINE_STYLES)]
        values = [s / top for s in row.singular_values]
        ax.plot(range(1, len(values) + 1), values, style, color=color, linewidth=1, alpha=0.8, marker=".")
    if blocks:
        mappable = plt.cm.ScalarMappable(cmap=depth, norm=plt.Normalize(low, high))
        bar = ax.figure.colorbar(mappable, ax=ax, label="block / stage")
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    ax.set_xlabel("singular value index i")
    ax.set_ylabel(r"$\sigma_i / \sigma_1$")
    ax.set_title("normalised spectra of the updates", fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(slots) > 1:
        for i, slot in enumerate(slots):
            ax.plot([], [], _LINE_STYLES[i % len(_LINE_STYLES)], color="0.3", label=f"slot {slot}")
        ax.legend(fontsize=8)


def _depth_panel(ax: plt.Axes, rows: Sequence[SpectrumRow]) -> None:
    thresholds = list(rows[0].effective_ranks) if rows else []
    by_part: dict[str, dict[int, list[SpectrumRow]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        # Stem and head layers have no block index, so they have no place on a depth axis.
        if row.block is not None:
            by_part[row.part][row.block].append(row)
    for i, (part, per_block) in enumerate(by_part.items()):
        color = f"C{i % 10}"
        xs = sorted(per_block)
        for t, style in zip(thresholds, _LINE_STYLES, strict=False):
            # Several layers of one part in one stage (ResNet) draw as points around their mean.
            means = [sum(r.effective_ranks[t] for r in per_block[x]) / len(per_block[x]) for x in xs]
            ax.plot(xs, means, style, color=color, marker="o", markersize=4, label=f"{part} {threshold_label(t)}%")
    if not by_part:
        ax.text(0.5, 0.5, "no layers in numbered blocks", transform=ax.transAxes, ha="center")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block / stage index")
    ax.set_ylabel("effective rank (energy threshold)")
    ax.set_title("effective rank by depth", fontsize=10)
    ax.grid(True, alpha=0.3)
    if by_part:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def plot_spectra(rows: Sequence[SpectrumRow], path: Path, title: str | None = None) -> Path:
    """Two panels: every slot's singular values over its largest, and effective rank against depth."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=150)
    _spectrum_panel(left, rows)
    _depth_panel(right, rows)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_truncation(rows: Sequence[TruncationRow], path: Path, metric: str = "acc1", title: str | None = None) -> Path:
    """Accuracy against the truncation rank k, with the full adapters and k = 0 drawn as reference lines."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=150)
    points = [(row.k, 100 * row.metrics[metric]) for row in rows if not row.full and row.k > 0]
    full = next((row for row in rows if row.full), None)
    zero = next((row for row in rows if row.k == 0 and not row.full), None)
    if full is not None:
        points.append((full.k, 100 * full.metrics[metric]))
        ax.axhline(100 * full.metrics[metric], color="tab:red", linestyle="--", linewidth=1, label=f"full (r={full.k})")
    if zero is not None:
        ax.axhline(100 * zero.metrics[metric], color="black", linestyle=":", linewidth=1, label="no update (k=0)")
    if points:
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label="truncated to rank k")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("rank k (log scale)")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8)
    return _save(fig, path)
