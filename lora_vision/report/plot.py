"""Test accuracy against trainable parameters: the picture every LoRA ablation is about.

Every series has its own (colour, marker) pair, however many there are. The marker names the method family
(`FAMILY_MARKERS`: a circle for plain LoRA, whatever its targets; one shape per variant and per baseline). The colour
names the series: the baselines keep their own colours, every other series takes the next of `PALETTE` (series
with more points first), then hues spread round the colour wheel. When a report's rows differ in a qualifier
(`SERIES_QUALIFIERS`: an input size, a model), the first qualifier group is drawn filled with solid lines and each
further group with its own fill and line style and a shade of the same colour, so one target set at two input sizes
reads as one hue twice.

Rank labels are placed after the layout is final, in display coordinates: each takes the nearest position around
its point where it overlaps no other label, marker or error bar and stays inside the axes, preferring positions
off the drawn lines. A series with a label that fits nowhere loses that label and lists its ranks, left to right,
in its legend entry instead; a series of one rank always names it there. Search trials are separate points: no
line, no labels.
"""

from __future__ import annotations

import colorsys
import io
import itertools
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # reports are written on headless machines (clusters, CI)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import cbook
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.colors import to_rgb
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.path import Path as MplPath
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

from lora_vision.report.collect import Row, pareto_front
from lora_vision.results import write_atomic

# Marker by method family: the `method` of a baseline, the `variant` of a LoRA row; anything else (a combination
# of variants, say) is OTHER_MARKER.
FAMILY_MARKERS = {
    "linear_probe": "s",
    "bitfit": "D",
    "full": "*",
    "lora": "o",
    "dora": "^",
    "pissa": "v",
    "rslora": "P",
    "loraplus": "X",
}
OTHER_MARKER = "h"
MARKER_SIZES = {"s": 8, "D": 7, "*": 13, "o": 5}
DEFAULT_MARKER_SIZE = 7
# The colours readers know the baselines by; no other series uses them.
BASELINE_COLOURS = {"linear_probe": "black", "full": "tab:red", "bitfit": "tab:olive"}
# Far from the baselines' colours and from the frontiers' grey.
PALETTE = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:cyan",
    "#393b79",
    "#e6ab02",
    "#8b008b",
)
# Qualifier groups after the first: line style and marker fill, in turn. A half-filled marker's other half is white.
LINESTYLES = ("-", "--", ":", "-.")
FILLS = ("full", "none", "left", "bottom", "right", "top")
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
LABEL_FONT_SIZE = 7
# Where a label may sit around its point: a direction (x, y) on one of the rings (points beyond the marker's edge).
# The nearer ring wins; on one ring, the earlier direction. Diagonals come first: beside a rising or flat line they
# stay off it.
DIRECTIONS = ((1, -1), (-1, 1), (1, 1), (-1, -1), (0, -1), (0, 1), (1, 0), (-1, 0))
RINGS = (1.5, 5.0, 9.0, 13.0)
# A position whose label crosses a drawn line counts as this many rings further out: a label off the lines two
# rings out reads better than one struck through next to its point.
CROSSING_COST = 2.5
# Space kept between a label and anything else, in pixels.
LABEL_PAD = 1.0
CAPSIZE = 3


@dataclass
class _Series:
    name: str
    # The series without its qualifier: what its base colour belongs to.
    key: str
    family: str
    baseline: bool
    trials: bool
    group: int
    members: list[tuple[Row, tuple[float, float, float]]] = field(default_factory=list)

    @property
    def marker(self) -> str:
        return FAMILY_MARKERS.get(self.family, OTHER_MARKER)

    @property
    def markersize(self) -> float:
        return MARKER_SIZES.get(self.marker, DEFAULT_MARKER_SIZE)

    @property
    def ranks(self) -> list[Any]:
        return [row.config.get("rank") for row, _ in self.members]

    @property
    def labelled(self) -> bool:
        """Points labelled by rank: a line of several ranks."""
        return not (self.baseline or self.trials) and len(set(self.ranks) - {None}) > 1

    def legend(self, list_ranks: bool) -> str:
        ranks = self.ranks
        if not (self.baseline or self.trials) and None not in ranks and (list_ranks or len(set(ranks)) == 1):
            return f"{self.name}, r={', '.join(str(r) for r in dict.fromkeys(ranks))}"
        return self.name


@dataclass
class _Label:
    text: str
    point: tuple[float, float]
    colour: Any
    # Marker radius, in points: labels start beyond it.
    radius: float
    series: int


def _point(row: Row) -> tuple[float, float, float] | None:
    params, acc = row.metrics["trainable_params"], row.metrics["test_acc1"]
    if params.mean is None or acc.mean is None:
        return None
    return params.mean, 100 * acc.mean, 100 * (acc.std or 0.0)


def _family(row: Row) -> str:
    return str(row.config.get("variant") or "lora") if row.config.get("method") == "lora" else str(row.config["method"])


def _collect(rows: list[Row]) -> tuple[list[_Series], dict[str, list[tuple[float, float]]]]:
    """The series (in the rows' order, points left to right) and the points of each qualifier group."""
    # Rows of several experiments, models or input sizes in one report would otherwise share a line.
    qualifiers = [name for name in SERIES_QUALIFIERS if len({row.config.get(name) for row in rows}) > 1]
    series: dict[str, _Series] = {}
    # The points of each qualifier group (one input size, one model): a frontier across groups would compare
    # settings, not methods.
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        point = _point(row)
        if point is None:
            continue
        prefix = ", ".join(SERIES_QUALIFIERS[name](row.config.get(name)) for name in qualifiers)
        trials = row.config.get("trial") is not None
        key = row.label + (", search trials" if trials else "")
        name = f"{prefix}: {key}" if prefix else key
        group = list(groups).index(prefix) if prefix in groups else len(groups)
        groups.setdefault(prefix, []).append(point[:2])
        baseline = row.config.get("method") != "lora"
        series.setdefault(name, _Series(name, key, _family(row), baseline, trials, group)).members.append((row, point))
    for one in series.values():
        one.members.sort(key=lambda member: member[1][0])
    return list(series.values()), groups


def _hue(index: int) -> tuple[float, float, float]:
    # Beyond the palette: hues a golden angle apart never repeat.
    return colorsys.hls_to_rgb((0.1 + 0.618034 * index) % 1.0, 0.42, 0.75)


def _shade(colour: Any, group: int) -> tuple[float, float, float]:
    """The colour of a series in qualifier group `group`: darker (lighter for dark colours) the later the group."""
    rgb = to_rgb(colour)
    if group == 0:
        return rgb
    amount = 0.6 * (1 - 0.5**group)
    target = 1.0 if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.3 else 0.0
    return tuple(c + (target - c) * amount for c in rgb)


def _colours(series: list[_Series]) -> list[tuple[float, float, float]]:
    """One colour per series, unique: a base colour per method and target set, shaded per qualifier group."""
    points: dict[str, int] = {}
    for one in series:
        points[one.key] = points.get(one.key, 0) + len(one.members)
    fixed = {
        one.key: BASELINE_COLOURS[one.family]
        for one in series
        if one.baseline and not one.trials and one.family in BASELINE_COLOURS
    }
    # Series with the most points get the first, most distinct colours.
    rest = sorted((key for key in points if key not in fixed), key=lambda key: -points[key])
    base = {**fixed, **{key: PALETTE[i] if i < len(PALETTE) else _hue(i) for i, key in enumerate(rest)}}
    return [_shade(base[one.key], one.group) for one in series]


def _style(one: _Series, colour: tuple[float, float, float]) -> dict[str, Any]:
    fill = FILLS[one.group % len(FILLS)]
    connected = not (one.baseline or one.trials) and len(one.members) > 1
    return dict(
        color=colour,
        marker=one.marker,
        markersize=one.markersize,
        linestyle=LINESTYLES[one.group % len(LINESTYLES)] if connected else "none",
        fillstyle="full" if fill == "none" else fill,
        markerfacecolor="white" if fill == "none" else colour,
        markerfacecoloralt="white",
        markeredgecolor=colour,
    )


def _box(centre: Any, half_width: float, half_height: float) -> Bbox:
    x, y = centre
    return Bbox.from_extents(x - half_width, y - half_height, x + half_width, y + half_height)


def _obstacles(ax: Axes, series: list[_Series], ringed: list[tuple[float, float]]) -> list[Bbox]:
    """Display boxes of every marker, error bar and ring, which labels must not cover."""
    px = ax.figure.dpi / 72
    boxes = []
    for one in series:
        half = one.markersize / 2 * px
        for _, (x, y, err) in one.members:
            centre = ax.transData.transform((x, y))
            boxes.append(_box(centre, half, half))
            if err:
                top, bottom = ax.transData.transform([(x, y + err), (x, y - err)])
                boxes.append(Bbox.from_extents(centre[0] - CAPSIZE * px, bottom[1], centre[0] + CAPSIZE * px, top[1]))
    for point in ringed:
        boxes.append(_box(ax.transData.transform(point), 6.5 * px, 6.5 * px))
    return boxes


def _crowding(centre: Any, obstacles: list[Bbox]) -> int:
    # Obstacles near a point, within about two labels' width and height.
    x, y = centre
    return sum(abs(box.x0 + box.x1 - 2 * x) < 80 and abs(box.y0 + box.y1 - 2 * y) < 50 for box in obstacles)


def _lines(ax: Axes) -> list[MplPath]:
    """The drawn lines (series, frontiers) in display coordinates; a label may cross one when nothing else fits."""
    paths = []
    for line in ax.get_lines():
        if line.get_linestyle() in ("None", "none", " ", "") or len(line.get_xdata()) < 2:
            continue
        xy = np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)
        if line.get_drawstyle() == "steps-post":
            xy = np.column_stack(cbook.pts_to_poststep(xy[:, 0], xy[:, 1]))
        paths.append(MplPath(ax.transData.transform(xy)))
    return paths


def _place(ax: Axes, renderer: RendererBase, labels: list[_Label], obstacles: list[Bbox]) -> list[_Label]:
    """Put each label where it overlaps no marker, error bar or placed label; return the labels that fit nowhere.

    Of the free positions the nearest wins, a position that crosses a line counting CROSSING_COST rings further out.
    """
    inside = ax.get_window_extent(renderer).padded(-LABEL_PAD)
    taken = [box.padded(LABEL_PAD) for box in obstacles]
    lines = _lines(ax)
    # The most crowded points choose first, while they still have room.
    crowding = [_crowding(ax.transData.transform(label.point), obstacles) for label in labels]
    order = sorted(range(len(labels)), key=lambda i: -crowding[i])
    dropped = []
    px = ax.figure.dpi / 72
    for i in order:
        label = labels[i]
        annotation = ax.annotate(
            label.text,
            label.point,
            xytext=(0, 0),
            textcoords="offset points",
            fontsize=LABEL_FONT_SIZE,
            color=label.colour,
            annotation_clip=False,
            horizontalalignment="center",
            verticalalignment="center",
        )
        # Measured once: every candidate box is this one moved.
        centred = annotation.get_window_extent(renderer)
        free = []
        for candidate, (ring, (dx, dy)) in enumerate(itertools.product(range(len(RINGS)), DIRECTIONS)):
            shift = (label.radius + RINGS[ring]) * px
            box = centred.translated(dx * (shift + centred.width / 2), dy * (shift + centred.height / 2))
            fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if fits and not any(box.overlaps(other) for other in taken):
                crossing = any(line.intersects_bbox(box, filled=False) for line in lines)
                free.append((ring + CROSSING_COST * crossing, candidate, ring, dx, dy))
        if not free:
            annotation.remove()
            dropped.append(label)
            continue
        _, _, ring, dx, dy = min(free)
        distance = label.radius + RINGS[ring]
        annotation.xyann = (dx * distance, dy * distance)
        annotation.set_horizontalalignment({1: "left", -1: "right", 0: "center"}[dx])
        annotation.set_verticalalignment({1: "bottom", -1: "top", 0: "center"}[dy])
        taken.append(annotation.get_window_extent(renderer).padded(LABEL_PAD))
    return dropped


def figure(rows: list[Row], title: str | None = None, ringed: list[tuple[float, float]] | None = None) -> Figure:
    """Draw accuracy against trainable parameters: each LoRA target set a line, its points labelled by rank.

    `ringed` points (trainable parameters, test accuracy in %) are circled: a search's own Pareto front, chosen on
    validation accuracy.
    """
    ringed = ringed or []
    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=150)
    series, groups = _collect(rows)
    colours = _colours(series)
    containers: list[ErrorbarContainer] = []
    labels = []
    for index, (one, colour) in enumerate(zip(series, colours, strict=True)):
        xs, ys, errs = zip(*(point for _, point in one.members), strict=True)
        containers.append(ax.errorbar(xs, ys, yerr=errs, capsize=CAPSIZE, **_style(one, colour)))
        if one.labelled:
            radius = one.markersize / 2
            labels += [
                _Label(f"r={row.config['rank']}", (x, y), colour, radius, index) for row, (x, y, _) in one.members
            ]
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
    if not series:
        ax.text(0.5, 0.5, "no completed runs", transform=ax.transAxes, ha="center")
    _lay_out_with_labels(fig, ax, series, containers, labels, ringed)
    return fig


def _lay_out_with_labels(
    fig: Figure,
    ax: Axes,
    series: list[_Series],
    containers: list[ErrorbarContainer],
    labels: list[_Label],
    ringed: list[tuple[float, float]],
) -> None:
    """Lay the figure out and place the rank labels; a series that loses a label lists its ranks in the legend.

    A longer legend entry narrows the axes and moves every point, so the labels are placed again until no further
    series needs its list (at most once per series).
    """
    listed: set[int] = set()
    while True:
        for index, (one, container) in enumerate(zip(series, containers, strict=True)):
            container.set_label(one.legend(index in listed))
        if series:
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        dropped = {label.series for label in _place(ax, renderer, labels, _obstacles(ax, series, ringed))}
        if dropped <= listed:
            return
        listed |= dropped
        for text in list(ax.texts):
            if isinstance(text, Annotation):
                text.remove()


def plot(
    rows: list[Row], path: Path, title: str | None = None, ringed: list[tuple[float, float]] | None = None
) -> Path:
    """Write the accuracy-vs-parameters PNG of `figure` to `path`."""
    fig = figure(rows, title, ringed)
    png = io.BytesIO()
    # No timestamp or version in the file: the same rows give byte-identical PNGs.
    fig.savefig(png, format="png", metadata={"Software": None})
    plt.close(fig)
    return write_atomic(path, png.getvalue())
