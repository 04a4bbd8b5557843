"""Where a study lives: the storage string of the sweeper's config, opened the same way by the sweeper and by
every trial that reports to it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from lora_vision.errors import UserError

# Seconds an SQLite writer waits for another worker's transaction instead of failing with "database is locked";
# trials are minutes apart, so a long wait costs nothing.
SQLITE_TIMEOUT_S = 60
# Workers started together all find a new database and create its tables at once; all but one fail ("table
# alembic_version already exists") and open it again once the winner is done.
CREATE_ATTEMPTS = 5
# Seconds after which a claim lock left behind by a killed worker is broken; a claim takes well under a second.
CLAIM_LOCK_GRACE_S = 30


class StorageError(UserError, ValueError):
    """A study storage that cannot be opened."""


def open_storage(storage: str | None) -> BaseStorage | None:
    """A database URL (`sqlite:///...`, `postgresql://...`) or a journal file path; None stays in memory.

    The same spelling `optuna-dashboard` takes, so the dashboard reads a study from the value given here.
    """
    if storage is None:
        return None
    try:
        return _open(storage)
    except (ImportError, OSError, ValueError, SQLAlchemyError) as err:
        raise StorageError(
            f"hydra.sweeper.storage={storage}: cannot open it ({type(err).__name__}: {err}); give a database URL "
            "Optuna accepts (sqlite:///path/optuna.db, postgresql://user@host/db with its driver installed), a "
            "journal file path, or null"
        ) from err


def study_file(storage: str | None) -> Path | None:
    """The file that holds the study: a journal file or an SQLite database; None for a server or memory."""
    if storage is None:
        return None
    if "://" not in storage:
        return Path(storage)
    if storage.startswith("sqlite:///"):
        return Path(storage.removeprefix("sqlite:///"))
    return None


@contextlib.contextmanager
def claim_lock(storage: str | None) -> Iterator[None]:
    """Held by a worker while it counts the study's trials and starts one, so that no other worker counts in
    between: a lock file beside a study kept in a file (`<file>.claim.lock`, created with O_EXCL, which network
    file systems honour too). A study on a database server gets none; the sweeper's check of the trial number
    keeps its budget there."""
    path = study_file(storage)
    if path is None:
        yield
        return
    lock = JournalFileOpenLock(f"{path}.claim", grace_period=CLAIM_LOCK_GRACE_S)
    lock.acquire()
    try:
        yield
    finally:
        # Gone when another worker broke it as stale; the sweeper's check of the trial number still holds the budget.
        with contextlib.suppress(RuntimeError):
            lock.release()


def _open(storage: str) -> BaseStorage:
    path = study_file(storage)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if "://" not in storage:
        return JournalStorage(JournalFileBackend(storage))
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if storage.startswith("sqlite:///") else {}
    attempt = 1
    while True:
        try:
            return RDBStorage(storage, engine_kwargs=engine_kwargs)
        except (IntegrityError, OperationalError):
            if attempt == CREATE_ATTEMPTS:
                raise
            time.sleep(0.5 * attempt)
            attempt += 1


def load_study(storage: str, study_name: str, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=open_storage(storage), pruner=pruner)
