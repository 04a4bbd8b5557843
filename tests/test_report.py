"""The report aggregates seeds, marks failures, draws the Pareto frontier and is deterministic."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from lora_vision.report import build_report
from lora_vision.report.__main__ import main
from lora_vision.report.collect import aggregate, pareto_front
from lora_vision.report.table import gap_closed, markdown


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
