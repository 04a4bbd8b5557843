"""The errors of adapter files: a file this version cannot read, or an adapter that does not fit its base."""

from __future__ import annotations

from lora_vision.errors import UserError


class AdapterMismatchError(UserError, ValueError):
    """An adapter does not fit the base model it is loaded onto; the message says what differs."""


class AdapterFormatError(UserError, ValueError):
    """A file is not an adapter this version of lora_vision can read; the message names the file and what is valid."""


class BaseWeightsMismatchError(AdapterMismatchError):
    """The base has the right architecture but other weights than the adapter was trained on."""
