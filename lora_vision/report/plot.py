"""Test accuracy against trainable parameters: the picture every LoRA ablation is about."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written on headless machines (clusters, CI)
import matplotlib.pyplot as plt

from lora_vision.report.collect import Row, pareto_front
from lora_vision.results import write_atomic

BASELINE_STYLE = {
    "linear probe": dict(marker="s", color="black", markersize=8),
    "full fine-tuning": dict(marker="*", color="tab:red", markersize=13),
    "BitFit": dict(marker="D", color="tab:olive", markersize=7),
}
# One dash pattern per frontier when a report has several (one per input size or model).
FRONTIER_DASHES = ((4, 2), (1, 2), (6, 2, 1, 2))
# Characters per title line: the width of the axes at the title's font size.
TITLE_WIDTH = 70
# Config fields that name a series when a report's rows differ in them, and how each reads in the legend.
SERIES_QUALIFIERS = {
    "experiment": str,
    "task": str,
    "model": str,
    "image_size": lambda size: f"{size} px",
}


def _point(row: Row) -> tuple[float, float, float] | None:
    params, acc = row.metrics["trainable_params"], row.metrics["test_acc1"]
    if params.mean is None or acc.mean is None:
        return None
    return params.mean, 100 * acc.mean, 100 * (acc.std or 0.0)


def plot(
    rows: list[Row], path: Path, title: str | None = None, ringed: list[tuple[float, float]] | None = None
) -> Path:
    """Write the accuracy-vs-parameters PNG; each LoRA target set is one line, its points labelled by rank.

    `ringed` points (trainable parameters, test accuracy in %) are circled: a search's own Pareto front, chosen on
    validation accuracy.
    """
    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=150)
    # Rows of several experiments, models or input sizes in one report would otherwise share a line.
    qualifiers = [field for field in SERIES_QUALIFIERS if len({row.config.get(field) for row in rows}) > 1]
    series: dict[str, list[tuple[Row, tuple[float, float, float]]]] = {}
    # The points of each qualifier group (one input size, one model): a frontier across groups would compare
    # settings, not methods.
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        point = _point(row)
        if point is not None:
            prefix = ", ".join(SERIES_QUALIFIERS[field](row.config.get(field)) for field in qualifiers)
            series.setdefault(f"{prefix}: {row.label}" if prefix else row.label, []).append((row, point))
            groups.setdefault(prefix, []).append(point[:2])
    lora_series = 0
    for label, members in series.items():
        members.sort(key=lambda m: m[1][0])
        xs, ys, errs = zip(*(p for _, p in members), strict=True)
        style = next((s for name, s in BASELINE_STYLE.items() if label.endswith(name)), None)
        if style is not None:
            # A qualified baseline ("224 px: linear probe") keeps its marker but takes the next colour, so the
            # same baseline at two sizes stays two distinguishable points.
            if label not in BASELINE_STYLE:
                style = {key: value for key, value in style.items() if key != "color"}
            ax.errorbar(xs, ys, yerr=errs, linestyle="none", label=label, capsize=3, **style)
            continue
        line = ax.errorbar(xs, ys, yerr=errs, marker="o", markersize=5, capsize=3, label=label)
        lora_series += 1
        for row, (x, y, _) in members:
            if row.config.get("rank") is None:
                continue
            ax.annotate(
                f"r={row.config.get('rank')}",
                (x, y),
                textcoords="offset points",
                # Alternate series put their labels below and above the points, so neighbours do not collide.
                xytext=(4, -11) if lora_series % 2 else (-8, 7),
                fontsize=7,
                color=line[0].get_color(),
            )
    for index, (prefix, points) in enumerate(groups.items()):
        front = pareto_front(points)
        if len(front) > 1:
            fx, fy = zip(*front, strict=True)
            label = f"Pareto frontier ({prefix})" if prefix else "Pareto frontier"
            dashes = FRONTIER_DASHES[index % len(FRONTIER_DASHES)]
            ax.step(fx, fy, where="post", color="0.55", dashes=dashes, linewidth=1, zorder=0, label=label)
    if ringed:
        rx, ry = zip(*ringed, strict=True)
        ax.scatter(
            rx,
            ry,
            s=160,
            facecolors="none",
            edgecolors="black",
            linewidths=1.2,
            zorder=3,
            label="search's Pareto front (on validation)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (count, log scale)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.grid(True, which="major", alpha=0.3)
    if title:
        # Wrapped: a title wider than the axes would run off the figure's left edge.
        ax.set_title("\n".join(textwrap.wrap(title, TITLE_WIDTH)), fontsize=11)
    if series:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        ax.text(0.5, 0.5, "no completed runs", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    png = io.BytesIO()
    # No timestamp or version in the file: the same rows give byte-identical PNGs.
    fig.savefig(png, format="png", metadata={"Software": None})
    plt.close(fig)
    return write_atomic(path, png.getvalue())
