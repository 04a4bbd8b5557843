"""Shared fixtures; the helpers test modules import are in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs the files on several worker processes (pytest-xdist); each, and every training process a
    # test starts, gets its share of the cores instead of all of them, which would oversubscribe them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# Seconds of test time per file where it is over 10 (the sum of its tests' durations in one `make test`, from
# `pytest --junitxml`, on 2 cores of an AMD EPYC with nothing else running).
LONG_FILES = {
    "test_search.py": 141,
    "test_train_real_data.py": 98,
    "test_config.py": 78,
    "test_damaged_files.py": 44,
    "test_sweep_launchers.py": 44,
    "test_bench.py": 37,
    "test_train.py": 30,
    "test_resume.py": 27,
    "test_multitask.py": 23,
    "test_sweep_load.py": 18,
    "test_sweep.py": 18,
    "test_vtab1k.py": 15,
    "test_command_line.py": 14,
    "test_peft_format.py": 12,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The longest files first, then those with the most slow tests, each file's tests kept together: `make test`
    # hands whole files to its workers in this order (--no-loadscope-reorder: pytest-xdist's own order, most tests
    # first, left the two longest-running files, of one and two tests, to the end), and starting the longest first
    # keeps one worker from finishing long after the other (it did by two minutes when only the slow tests were
    # counted).
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: (-LONG_FILES.get(item.path.name, 0), -slow[item.path]))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


REAL_DATA = "real_data"


def _real_data_folder(factory: pytest.TempPathFactory) -> Path:
    # The session's temporary root: a pytest-xdist worker's own root lies inside the controller's.
    root = factory.getbasetemp()
    return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / REAL_DATA


@pytest.fixture(scope="session")
def real_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder, shared by every test of the session and every pytest-xdist worker, where the real-data archives
    are extracted once: the datamodules extract under a file lock and reuse a finished extraction."""
    path = _real_data_folder(tmp_path_factory)
    path.mkdir(exist_ok=True)
    return path


def pytest_sessionfinish(session: pytest.Session) -> None:
    # ~73k extracted files: removed once every worker is done (by the controller, or the only process), rather than
    # left to pytest's rotation of old temporary folders.
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(_real_data_folder(factory), ignore_errors=True)
