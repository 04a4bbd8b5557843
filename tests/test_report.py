"""The report aggregates seeds, marks failures, draws the Pareto frontier and is deterministic; every series has its
own style, rank labels never overlap, search trials are told apart, and the CSV alone redraws a report."""

from __future__ import annotations

import collections
import csv
import io
import itertools
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lora_vision.report import build_report, redraw_report
from lora_vision.report.__main__ import main
from lora_vision.report.collect import ReportInputError, aggregate, find_results, load_records, pareto_front
from lora_vision.report.plot import figure
from lora_vision.report.table import gap_closed, markdown, readable, to_csv


def record(method: str, rank: int | None, targets: list[str] | None, acc: float | None, params: int, **extra) -> dict:
    return {
        "experiment": "study",
        "model": "tiny",
        "data": "SyntheticDataModule",
        "image_size": 32,
        "method": method,
        "targets": targets,
        "blocks": None,
        "rank": rank,
        "alpha": None if rank is None else 8.0,
        "dropout": None if rank is None else 0.0,
        "lr": 0.01,
        "batch_size": 32,
        "max_epochs": 2,
        "seed": 0,
        "trainable_params": params,
        "trainable_percent": params / 1000,
        "best_val_acc1": acc,
        "test_acc1": acc,
        "test_acc5": 1.0,
        "wall_time_s": 10.0,
        "status": "completed",
        **extra,
    }


RECORDS = [
    record("lora", 4, ["qv"], 0.70, 400),
    record("lora", 4, ["qv"], 0.74, 400, seed=1),
    record("linear_probe", None, None, 0.50, 100),
    record("full", None, None, 0.80, 100_000),
    record("lora", 2, ["qv"], 0.65, 200),
    record("lora", 2, ["mlp"], None, 300, status="failed", error="RuntimeError: loss is nan"),
]


def write_runs(root: Path, records: list[dict]) -> None:
    for i, rec in enumerate(records):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "results.json").write_text(json.dumps(rec))


def test_seeds_are_aggregated_as_mean_and_std() -> None:
    rows = aggregate(RECORDS)
    lora_r4 = next(r for r in rows if r.config["rank"] == 4)
    assert lora_r4.runs == 2
    assert lora_r4.metrics["test_acc1"].mean == pytest.approx(0.72)
    assert lora_r4.metrics["test_acc1"].std == pytest.approx(0.0282843, rel=1e-5)  # sample std of 0.70, 0.74


def test_rows_are_sorted_baseline_lora_full() -> None:
    methods = [(r.config["method"], r.config["targets"], r.config["rank"]) for r in aggregate(RECORDS)]
    assert methods == [
        ("linear_probe", None, None),
        ("lora", "mlp", 2),
        ("lora", "qv", 2),
        ("lora", "qv", 4),
        ("full", None, None),
    ]


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(100, 50.0), (200, 65.0), (300, 60.0), (400, 72.0), (100_000, 80.0), (150, 49.0)]
    assert pareto_front(points) == [(100, 50.0), (200, 65.0), (400, 72.0), (100_000, 80.0)]


def test_report_files_mark_failures_and_are_deterministic(tmp_path: Path) -> None:
    write_runs(tmp_path / "runs", RECORDS)
    first = build_report([tmp_path / "runs"], tmp_path / "a", title="study")
    second = build_report([tmp_path / "runs"], tmp_path / "b", title="study")
    for name in ("report.md", "report.csv", "report.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    table = first.markdown.read_text()
    assert table.count("\n| ") == 6  # header + 5 configurations
    assert "72.00 ± 2.83" in table
    assert "| failed |" in table and "RuntimeError: loss is nan" in table
    rows = list(csv.DictReader(io.StringIO(first.csv.read_text())))
    assert [r["failed"] for r in rows] == ["0", "1", "0", "0", "0"]
    assert first.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert second.png.stat().st_size > 10_000


def test_cli_reports_missing_inputs_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def error(path: Path) -> str:
        with pytest.raises(SystemExit) as exit_:
            main([str(path)])
        assert exit_.value.code == 2
        return capsys.readouterr().err

    assert "python -m lora_vision.report: error: " in error(tmp_path / "nope")
    assert "does not exist" in error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no results.json" in error(tmp_path / "empty")
    write_runs(tmp_path / "runs", RECORDS[:1])
    (tmp_path / "runs" / "0" / "results.json").write_text('{"status": "compl')
    assert "not valid JSON" in error(tmp_path / "runs")


def test_gap_closed_is_each_rows_share_of_the_probe_to_full_gap() -> None:
    rows = aggregate(RECORDS)
    gaps = {
        (r.config["method"], r.config["targets"], r.config["rank"]): gap_closed(rows).get(i) for i, r in enumerate(rows)
    }
    # probe 50%, full 80%: r=4 (mean 72%) closes 22/30 of the gap, r=2 (65%) half of it; the failed row has none.
    assert gaps[("lora", "qv", 4)] == pytest.approx(100 * 22 / 30)
    assert gaps[("lora", "qv", 2)] == pytest.approx(50.0)
    assert (gaps[("linear_probe", None, None)], gaps[("full", None, None)]) == (0.0, 100.0)
    assert gaps[("lora", "mlp", 2)] is None
    table = markdown(rows)
    assert "| gap closed (%) |" in table.splitlines()[0] and "| 73 | 2 |" in table


def test_gap_closed_pairs_rows_with_the_baselines_of_their_own_setting() -> None:
    at_64 = [{**r, "image_size": 64, "test_acc1": r["test_acc1"] and r["test_acc1"] - 0.1} for r in RECORDS[:4]]
    rows = aggregate(RECORDS + at_64)
    gaps = gap_closed(rows)
    lora_r4 = {r.config["image_size"]: gaps[i] for i, r in enumerate(rows) if r.config["rank"] == 4}
    assert lora_r4 == {32: pytest.approx(100 * 22 / 30), 64: pytest.approx(100 * 22 / 30)}
    # Without full fine-tuning in a setting, its rows get no share.
    assert gap_closed(aggregate([r for r in RECORDS if r["method"] != "full"])) == {}


def test_settings_that_differ_between_rows_get_a_column_and_a_legend_qualifier(tmp_path: Path) -> None:
    assert "image size" not in markdown(aggregate(RECORDS)).splitlines()[0]
    at_64 = [{**r, "image_size": 64} for r in RECORDS[:4]]
    header = markdown(aggregate(RECORDS + at_64)).splitlines()[0]
    assert header.startswith("| model | image size | method |")
    write_runs(tmp_path / "runs", RECORDS + at_64)
    report = build_report([tmp_path / "runs"], tmp_path / "out")
    single = build_report([tmp_path / "runs" / str(i) for i in range(len(RECORDS))], tmp_path / "single")
    assert report.png.read_bytes() != single.png.read_bytes()


def test_rows_of_a_learning_rate_search_sort_by_value_not_by_text() -> None:
    lrs = [3e-5, 1e-4, 3e-4, 1e-3]
    rows = aggregate([record("full", None, None, 0.7, 100, lr=lr) for lr in reversed(lrs)])
    assert [r.config["lr"] for r in rows] == lrs


def series_lines(fig: Figure) -> dict[str, Line2D]:
    """The data line of every series in the legend, by its legend text."""
    (ax,) = fig.axes
    handles, labels = ax.get_legend_handles_labels()
    return {label: h.lines[0] for h, label in zip(handles, labels, strict=True) if isinstance(h, ErrorbarContainer)}


def test_every_series_has_its_own_colour_and_marker_however_many_there_are() -> None:
    targets = [f"t{i}" for i in range(12)]
    runs = [
        record("lora", rank, [t], 0.6 + 0.01 * i, 100 * (i + 1) * rank)
        for i, t in enumerate(targets)
        for rank in (2, 4)
    ]
    runs += [record("lora", 8, ["qv"], 0.7, 800, variant=v) for v in ("dora", "pissa", "rslora", "loraplus")]
    runs += [record(m, None, None, 0.5, 10_000) for m in ("linear_probe", "bitfit", "full")]
    runs += [{**r, "image_size": 64} for r in runs[:4] + runs[-3:]]
    fig = figure(aggregate(runs))
    lines = series_lines(fig)
    assert len(lines) == 12 + 4 + 3 + 2 + 3
    pairs = [(to_rgba(line.get_color()), line.get_marker()) for line in lines.values()]
    assert len(set(pairs)) == len(pairs)
    # The marker names the method family; the qualifier group (here the input size) the fill and line style.
    markers = {label.split(": ")[1].split(" ")[0]: line.get_marker() for label, line in lines.items()}
    assert markers == {
        "linear": "s",
        "BitFit": "D",
        "LoRA": "o",
        "DoRA": "^",
        "PiSSA": "v",
        "rsLoRA": "P",
        "LoRA+": "X",
        "full": "*",
    }
    at_64 = [line for label, line in lines.items() if label.startswith("64 px")]
    assert {line.get_markerfacecolor() for line in at_64} == {"white"}
    assert {line.get_linestyle() for line in at_64 if line.get_linestyle() != "None"} == {"--"}
    plt.close(fig)


def test_rank_labels_do_not_overlap_and_lost_ones_are_listed_in_the_legend() -> None:
    # Eight target sets whose points crowd around 1e5 parameters and 70%.
    runs = [
        record("lora", rank, [f"t{i}"], 0.70 + 0.001 * (i + rank % 3), 100_000 + 2_000 * i + 500 * rank)
        for i in range(8)
        for rank in (1, 2, 4, 8)
    ]
    fig = figure(aggregate(runs) + aggregate([record("full", None, None, 0.8, 5_000_000)]))
    (ax,) = fig.axes
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [text for text in ax.texts if text.get_text().startswith("r=")]
    boxes = [text.get_window_extent(renderer) for text in labels]
    assert labels
    overlapping = [
        (a.get_text(), b.get_text())
        for (a, p), (b, q) in itertools.combinations(zip(labels, boxes, strict=True), 2)
        if p.overlaps(q)
    ]
    assert overlapping == []
    inside = ax.get_window_extent(renderer)
    assert all(inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1) for box in boxes)
    # Series colours are unique, so a label's colour names its series: one that lost a label lists its ranks.
    placed = collections.Counter(to_rgba(text.get_color()) for text in labels)
    for label, line in series_lines(fig).items():
        if label.startswith("LoRA"):
            assert placed[to_rgba(line.get_color())] == 4 or label.endswith(", r=1, 2, 4, 8"), label
    plt.close(fig)


def trial_record(trial: int, lr: float, rank: int, acc: float, **extra) -> dict:
    return record("lora", rank, ["qv"], acc, 100 * rank, lr=lr, trial=trial, **extra)


def test_search_trials_get_their_number_and_objective_and_readable_settings(tmp_path: Path) -> None:
    trials = [
        trial_record(0, 0.00019351140885595286, 4, 0.62, objective=0.6123456, objective_metric="val/acc1"),
        trial_record(1, 0.0031, 8, 0.70, objective=0.7, objective_metric="val/acc1"),
        trial_record(2, 0.0125, 2, 0.66, objective=0.65, objective_metric="val/acc1"),
        trial_record(3, 0.0031, 8, 0.68, objective=0.68, objective_metric="val/acc1"),
    ]
    write_runs(tmp_path / "search", trials)
    report = build_report([tmp_path / "search"], tmp_path / "out")
    header, _, *lines = report.markdown.read_text().splitlines()
    assert header.startswith("| trial | model | lr | method |")
    assert "| best val acc1 (%) | objective (val/acc1) | test acc1 (%) |" in header
    cells = {line.split(" | ")[0].strip("| "): line for line in lines}
    # Trials 1 and 3 share every setting but their number: two rows, not two seeds of one.
    assert sorted(cells) == ["0", "1", "2", "3"]
    assert "| 1.94e-4 |" in cells["0"] and "| 0.6123 |" in cells["0"] and "| 8 |" in cells["0"]
    assert "| 3.1e-3 |" in cells["1"] and "| 0.0125 |" in cells["2"]
    rows = {r["trial"]: r for r in csv.DictReader(io.StringIO(report.csv.read_text()))}
    assert rows["0"]["lr"] == "0.00019351140885595286" and rows["0"]["objective_mean"] == "0.6123456"
    # Trials are points of a search, not a rank series: no line joins them and no rank labels them.
    fig = figure(report.rows)
    (line,) = series_lines(fig).values()
    assert line.get_linestyle() == "None" and len(line.get_xdata()) == 4
    assert not fig.axes[0].texts
    plt.close(fig)


def test_objectives_are_read_when_present_and_never_required() -> None:
    assert "objective" not in markdown(aggregate(RECORDS)).splitlines()[0]
    # A two-objective search's list of values is no single objective.
    pareto = [trial_record(0, 1e-3, 4, 0.6, objective=[0.6, 400.0]), trial_record(1, 1e-3, 8, 0.7)]
    header = markdown(aggregate(pareto)).splitlines()[0]
    assert header.startswith("| trial |") and "objective" not in header
    mixed = [trial_record(0, 1e-3, 4, 0.6, objective=0.5, objective_metric="val/acc1"), trial_record(1, 1e-3, 8, 0.7)]
    mixed += [trial_record(2, 1e-3, 2, 0.6, objective=0.4, objective_metric="val/loss")]
    assert "| objective |" in markdown(aggregate(mixed)).splitlines()[0]
    # A run recorded before results files held the objective is a seed of the same row as one recorded after.
    (row,) = aggregate([RECORDS[0], {**RECORDS[1], "objective": 0.7, "objective_metric": "val/acc1"}])
    assert row.runs == 2 and row.config["objective_metric"] == "val/acc1" and row.metrics["objective"].n == 1


def test_settings_print_to_three_significant_digits() -> None:
    values = (0.00019351140885595286, 0.003, 3e-05, 0.01, 2.8284271247461903, 8.0, 0.25, 123456.0)
    assert [readable(v) for v in values] == ["1.94e-4", "3e-3", "3e-5", "0.01", "2.83", "8", "0.25", "1.23e5"]
    assert readable(0.6123456, 4) == "0.6123"


COMPLETED = [r for r in RECORDS if r["status"] == "completed"]


def test_a_report_redrawn_from_its_csv_is_the_report_of_the_runs(tmp_path: Path) -> None:
    runs = COMPLETED + [{**r, "image_size": 64} for r in COMPLETED] + [trial_record(7, 1.5e-4, 4, 0.6, objective=0.6)]
    write_runs(tmp_path / "runs", runs)
    built = build_report([tmp_path / "runs"], tmp_path / "built", title="study")
    redrawn = redraw_report(built.csv, tmp_path / "redrawn", title="study")
    for name in ("report.md", "report.csv", "report.png"):
        assert (tmp_path / "built" / name).read_bytes() == (tmp_path / "redrawn" / name).read_bytes(), name
    assert to_csv(redrawn.rows) == built.csv.read_text()
    # The CSV of an older report lacks later columns; what it has still gives the same table.
    header, *body = list(csv.reader(io.StringIO(built.csv.read_text())))
    later = {"batch_size", "max_epochs", "trial", "objective_metric", "objective_mean", "objective_std", "objective_n"}
    keep = [i for i, name in enumerate(header) if name not in later]
    old = tmp_path / "old" / "report.csv"
    old.parent.mkdir()
    grid = [row for row in body if row[header.index("trial")] == ""]
    old.write_text("".join(",".join(row[i] for i in keep) + "\n" for row in [header, *grid]))
    assert main(["--from-csv", str(old), "--title", "study"]) == 0
    expected = markdown(aggregate([r for r in runs if "trial" not in r]))
    assert (tmp_path / "old" / "report.md").read_text() == "# study\n\n" + expected


def test_redrawing_refuses_what_the_csv_cannot_reproduce(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_runs(tmp_path / "failed", RECORDS)
    with_failure = build_report([tmp_path / "failed"], tmp_path / "a").csv
    with pytest.raises(ReportInputError, match="did not complete"):
        redraw_report(with_failure, tmp_path / "b")
    # Baselines at two epoch budgets: without the max_epochs column the gap closed would pair them wrongly.
    runs = COMPLETED + [{**r, "max_epochs": 4, "test_acc1": r["test_acc1"] - 0.05} for r in COMPLETED]
    write_runs(tmp_path / "epochs", runs)
    text = build_report([tmp_path / "epochs"], tmp_path / "c").csv.read_text()
    header, *body = list(csv.reader(io.StringIO(text)))
    drop = header.index("max_epochs")
    (tmp_path / "d").mkdir()
    lossy = tmp_path / "d" / "report.csv"
    lossy.write_text("".join(",".join(c for i, c in enumerate(row) if i != drop) + "\n" for row in [header, *body]))
    with pytest.raises(ReportInputError, match="gap closed"):
        redraw_report(lossy, tmp_path / "e")
    with pytest.raises(SystemExit):
        main(["--from-csv", str(lossy), str(tmp_path / "epochs")])
    assert "not both" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for path, message in ((tmp_path / "nope.csv", "does not exist"), (tmp_path / "other.csv", "not a report.csv")):
        with pytest.raises(SystemExit) as exit_:
            main(["--from-csv", str(path)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_runs_are_named_by_the_model_as_built(tmp_path: Path) -> None:
    # A random-init two-block ViT must not be reported under the pretrained checkpoint's name.
    built = "vit_tiny_patch16_224 (depth=2, embed_dim=64; random init)"
    write_runs(
        tmp_path, [record("lora", 4, ["qv"], 0.8, 400, model="vit_tiny_patch16_224.augreg_in21k", model_label=built)]
    )
    (row,) = aggregate(load_records(find_results([tmp_path])))
    assert row.config["model"] == built
