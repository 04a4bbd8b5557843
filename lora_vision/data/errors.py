"""Error types of the data layer, so callers can tell missing data from malformed data."""

from __future__ import annotations

from lora_vision.errors import UserError


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset (or one of its splits) is not where the configuration says, and cannot be fetched.

    The message names the expected location and the datamodule option to change.
    """


class DatasetFormatError(UserError, ValueError):
    """The dataset exists but its layout or content is not what the datamodule expects."""


class DataOptionError(UserError, ValueError):
    """A datamodule option has a value the datamodule cannot use; the message names the option and the valid values."""
