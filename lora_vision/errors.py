"""The base class of every error in what the user asked for, and how the entry points report one.

A user error (a bad config value or command-line override, missing or malformed data, unavailable weights, an
unusable output directory, a run that diverged at the chosen learning rate) is reported as one message that names
the bad value and what is valid, and the process exits with status 2. A traceback would point into lora_vision's
code, where nothing is wrong. Any other exception is a bug and keeps its traceback. HYDRA_FULL_ERROR=1 (Hydra's
own switch) shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

# The exit status of a user error: 2, as argparse uses for a bad command line.
USER_ERROR_EXIT_STATUS = 2


class UserError(Exception):
    """Something the user asked for is wrong or unavailable; the message says what and what would be valid."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the user named (a run, an adapter, a base checkpoint) does not exist."""


class OutputWriteError(UserError, OSError):
    """A result could not be written (no space, no permission); the previous version of the file is unchanged."""


def full_traceback_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextmanager
def user_errors_as_messages(prog: str) -> Iterator[None]:
    """Turn a `UserError` raised inside the block into `prog: error: message` on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        if full_traceback_requested():
            raise
        exit_with_message(prog, err)


def one_line(err: BaseException) -> str:
    """`err` as its type and the first line of its text, to quote a library's reason inside a one-line message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def exit_with_message(prog: str, err: UserError) -> NoReturn:
    print(f"{prog}: error: {err}", file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT_STATUS) from None
