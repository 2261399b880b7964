"""Every clipdex exception: one base class, a subclass per kind of failure, each knowing what it means to a caller.

The message is for the user and says what to do. `exit_code` is what the CLI exits with, `http_status` what the
server answers; both read them from the exception, never from its name.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import ClassVar

from clipdex.retrieval.config import human_bytes


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


class DiskFullError(ClipdexError):
    """A write found no space left on its disk; what was published before is kept."""

    http_status = 507


class ReadOnlyError(ClipdexError):
    """A command that changes the index (or a cache) met a folder it cannot write."""

    http_status = 503


class DiskIOError(ClipdexError):
    """The disk answered a read or write with an I/O error."""

    http_status = 503


_FULL = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def is_unwritable(e: OSError) -> bool:
    return e.errno in _UNWRITABLE


def disk_error(e: BaseException, where: Path | None = None) -> ClipdexError | None:
    """The one-line error for a full, read-only or failing disk met while writing `where` (or the file the error
    names), or None when `e` is something else. OSErrors are read by errno; errors that libraries raise in their own
    types (DuckDB's, FAISS's, Arrow's) carry the system's message for it, which is what is read from them."""
    code = e.errno if isinstance(e, OSError) and e.errno else _errno_in(str(e))
    if code not in (*_FULL, *_UNWRITABLE, errno.EIO):
        return None
    named = e.filename if isinstance(e, OSError) and e.filename else _path_in(str(e))
    target = Path(str(named)) if named else where
    shown = str(target) if target is not None else "a file"
    if code in _FULL:
        mount = _mount_point(target) if target is not None else None
        disk = os.statvfs(mount) if mount is not None else None
        space = f", {human_bytes(disk.f_bavail * disk.f_frsize)} free" if disk is not None else ""
        return DiskFullError(
            f"no space left on the disk holding {mount or shown}{space}, while writing {shown}; free some space and run "
            "the same command again (what was published before is kept and still answers searches)"
        )
    if code == errno.EROFS:
        return ReadOnlyError(
            f"{shown} cannot be written: it is on a read-only file system; searches still work, but changing the "
            "index needs a folder you can write"
        )
    if code in _UNWRITABLE:
        return ReadOnlyError(
            f"{shown}: {os.strerror(code)}; this command needs to write there (searches do not): give a folder you can "
            "write, or run it as a user who can"
        )
    return DiskIOError(
        f"the disk failed to read or write {shown} (I/O error); what was published before is kept: check the disk "
        "and run the same command again"
    )


def _errno_in(message: str) -> int | None:
    for code in (*_FULL, *_UNWRITABLE, errno.EIO):
        if os.strerror(code) in message:
            return code
    return None


def _path_in(message: str) -> str | None:
    """The file a library's message names: the first absolute path whose folder exists here (FAISS also names its
    own source file)."""
    found = re.findall(r"(/[^\s\"':,]+)", message)
    return next((f for f in found if Path(f).parent.is_dir()), None)


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path
