"""Run records: atomic JSON writes, versions and git state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_vision.results import finite_or_none, git_state, versions, write_json_atomic


def test_write_is_complete_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "sub" / "results.json", {"acc": 0.5, "layers": [1, 2]})
    assert json.loads(path.read_text()) == {"acc": 0.5, "layers": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "results.json", {"status": "completed"})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"status": object()})
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_nan_metrics_become_null() -> None:
    assert finite_or_none(float("nan")) is None
    assert finite_or_none(None) is None
    assert finite_or_none(0.25) == 0.25


def test_versions_and_git_state_are_json_safe() -> None:
    record = {**versions(), **git_state()}
    assert set(record) >= {"python", "torch", "timm", "lightning", "git_commit", "git_dirty"}
    assert json.loads(json.dumps(record)) == record
    commit = record["git_commit"]
    assert commit is None or len(commit) == 40
