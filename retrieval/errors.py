"""Every clipdex exception: one base class, a subclass per kind of failure, each knowing what it means to a caller.

The message is for the user and says what to do. `exit_code` is what the CLI exits with, `http_status` what the
server answers; both read them from the exception, never from its name.
"""

from __future__ import annotations

from typing import ClassVar


class ClipdexError(Exception):
    """Base class: the message is meant for the user and says what to do."""

    exit_code: ClassVar[int] = 2
    http_status: ClassVar[int] = 400  # the request is at fault unless a subclass says otherwise


class ModelError(ClipdexError):
    """The model name, config file or weights cannot be used."""


class IndexNotFoundError(ClipdexError):
    """The index directory is missing or holds no clipdex index."""

    http_status = 503  # the index, not the request, is at fault: `clipdex check` says more


class IndexFormatError(ClipdexError):
    """The index directory exists but is damaged, truncated or of a newer format."""

    http_status = 503


class IndexLockedError(ClipdexError):
    """Another process is writing to the index."""


class InputError(ClipdexError):
    """A path, caption file, column or option given by the user is unusable."""


class DatasetError(ClipdexError):
    """An evaluation dataset root is missing, incomplete or of an unknown layout."""


class ItemNotFoundError(InputError):
    """No item has the id asked for (in the server: a 404)."""

    http_status = 404


class FileGoneError(ClipdexError):
    """An item's file is missing, replaced by something else, or no longer an image."""

    http_status = 404


class UploadTooLargeError(ClipdexError):
    """A request body over the server's upload limit."""

    http_status = 413

    def __init__(self, limit: int):
        super().__init__(f"the upload is over the limit of {limit} bytes")


class ImageDecodeError(ClipdexError):
    """A file could not be turned into an image; the message is the reason stored in the catalog."""


class Interrupted(ClipdexError):
    """Ctrl-C during a run; the work committed so far is kept."""

    exit_code = 130  # what a shell expects of a program stopped by SIGINT
