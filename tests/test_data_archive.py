"""Tar extraction: once, atomically, lock-guarded, re-extracted when the archive changes."""

import multiprocessing
import os
import re
import tarfile
import threading
import time

import pytest

from lora_vision.data.archive import MARKER_NAME, archive_stem, extract_archive
from lora_vision.data.errors import DatasetFormatError, DatasetNotFoundError

FILES = {"train/a/0.txt": b"first", "train/b/1.txt": b"second", "test/a/2.txt": b"third"}


@pytest.fixture
def archive(tmp_path):
    source = tmp_path / "source"
    for name, content in FILES.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(content)
    path = tmp_path / "toy.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname=".")
    return path


@pytest.fixture
def extractions(monkeypatch):
    """Records every real extraction; the sleep widens the window in which concurrent callers overlap."""
    calls = []
    original = tarfile.TarFile.extractall

    def counting_extractall(self, *args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", counting_extractall)
    return calls


def assert_intact(dest):
    assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*.txt")} == FILES
    assert (dest / MARKER_NAME).is_file()
    assert [p.name for p in dest.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_archive_stem_strips_tar_suffixes():
    assert [archive_stem(n) for n in ("a.tar", "b.tar.gz", "c.TGZ", "d.tar.xz")] == ["a", "b", "c", "d"]


def test_extracts_once_and_again_only_when_the_archive_changes(archive, tmp_path, extractions):
    dest = tmp_path / "cache" / "toy"
    assert extract_archive(archive, dest) == dest
    extract_archive(archive, dest)
    assert len(extractions) == 1
    assert_intact(dest)
    os.utime(archive, ns=(0, 0))
    extract_archive(archive, dest)
    assert len(extractions) == 2
    assert_intact(dest)


def test_concurrent_threads_extract_one_intact_copy(archive, tmp_path, extractions):
    dest = tmp_path / "cache" / "toy"
    threads = [threading.Thread(target=extract_archive, args=(archive, dest)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(extractions) == 1
    assert_intact(dest)


def test_concurrent_processes_extract_one_intact_copy(archive, tmp_path, extractions):
    dest = tmp_path / "cache" / "toy"
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=extract_archive, args=(archive, dest)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert_intact(dest)


def test_interrupted_extraction_leaves_nothing_behind(archive, tmp_path, monkeypatch):
    def failing_extractall(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", failing_extractall)
    dest = tmp_path / "cache" / "toy"
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, dest)
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == ["toy.lock"]


def test_not_a_tar_names_the_file(tmp_path):
    bogus = tmp_path / "images.tar"
    bogus.write_text("not a tar")
    with pytest.raises(DatasetFormatError, match=f"{re.escape(str(bogus))} is not a tar archive"):
        extract_archive(bogus, tmp_path / "out")


def test_missing_archive_names_the_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"missing\.tar does not exist"):
        extract_archive(tmp_path / "missing.tar", tmp_path / "out")


def test_refuses_to_overwrite_a_directory_it_did_not_create(archive, tmp_path):
    dest = tmp_path / "precious"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(DatasetFormatError, match="not extracted by lora_vision"):
        extract_archive(archive, dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_unsafe_members_are_rejected(tmp_path):
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="../escaped.txt")
    with pytest.raises(tarfile.OutsideDestinationError):
        extract_archive(evil, tmp_path / "cache" / "evil")
    assert not (tmp_path / "cache" / "escaped.txt").exists()
