"""Every clipdex exception: one base class, a subclass per kind of failure, each knowing what it means to a caller.

The message is for the user and says what to do. `exit_code` is what the CLI exits with, `http_status` what the
server answers; both read them from the exception, never from its name.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import types
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


class FileTimeoutError(ClipdexError):
    """Reading an item's file took too long (a hung network share), or too many reads were waiting."""

    http_status = 504


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
    module = _half_imported(e)
    if module is not None:
        return DiskIOError(
            f"Python's module {module} was left half-loaded by an earlier failure to read its files (I/O error); "
            "check the disk and run the same command again"
        )
    cause = _os_cause(e)
    if cause is not None:  # a library's own error raised while an OSError was handled (torch.save into a file)
        e = cause
    code = e.errno if isinstance(e, OSError) and e.errno else _errno_in(str(e))
    if code not in (*_FULL, *_UNWRITABLE, errno.EIO):
        return None
    # an OSError from the system names its file (or none: "Input/output error" is no path); a library's names it in words
    named = e.filename if isinstance(e, OSError) and e.errno else _path_in(str(e))
    target = Path(str(named)) if named else where
    shown = str(target) if target is not None else "a file"
    if code in _FULL:
        mount = _mount_point(target) if target is not None else None
        disk = os.statvfs(mount) if mount is not None else None
        space = f", {human_bytes(disk.f_bavail * disk.f_frsize)} free" if disk is not None else ""
        kept = " (what was published before is kept and still answers searches)" if _in_index(target) else ""
        return DiskFullError(
            f"no space left on the disk holding {mount or shown}{space}, while writing {shown}; free some space and run "
            f"the same command again{kept}"
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
    kept = "what was published before is kept: " if _in_index(target) else ""
    return DiskIOError(
        f"the disk failed to read or write {shown} (I/O error); {kept}check the disk and run the same command again"
    )


def _half_imported(e: BaseException) -> str | None:
    """The submodule a package imported again lacks, when `e` is the error of reaching it. A package whose import
    raised (a failing disk: an I/O error reading one of its files, handled where it was met) is dropped, but the
    submodules it had loaded stay loaded; imported again, the package does not get them back as attributes, and a
    library reaching one fails later, in another way (`module 'onnx' has no attribute 'external_data_helper'`)."""
    if not isinstance(e, AttributeError) or not isinstance(getattr(e, "obj", None), types.ModuleType) or not e.name:
        return None
    module = f"{e.obj.__name__}.{e.name}"  # type: ignore[attr-defined]
    return module if module in sys.modules else None


def _os_cause(e: BaseException) -> OSError | None:
    """The OSError with an errno in `e`'s chain of causes, if any."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def _in_index(path: Path | None) -> bool:
    """Whether `path` is an index folder or inside one (what holds a manifest.json beside a catalog)."""
    if path is None:
        return False
    path = path.absolute()
    return any((p / "manifest.json").is_file() and (p / "catalog.duckdb").is_file() for p in (path, *path.parents))


def _errno_in(message: str) -> int | None:
    for code in (*_FULL, *_UNWRITABLE, errno.EIO):
        if os.strerror(code) in message:
            return code
    if "fsync failed" in message:  # DuckDB's FatalException for a write its disk did not make durable
        return errno.EIO
    for words, code in _SQLITE:
        if words in message:
            return code
    return None


# SQLite's own words for a failing and a full disk (sqlite3.OperationalError), which name no errno
_SQLITE = (("disk I/O error", errno.EIO), ("database or disk is full", errno.ENOSPC))


def _path_in(message: str) -> str | None:
    """The file a library's message names: the first absolute path whose folder exists here (FAISS also names its
    own source file)."""
    found = re.findall(r"(?:^|[\s\"'(])(/[^\s\"':,)]+)", message)  # a path starts a word: not "Input/output"
    return next((f for f in found if Path(f).parent.is_dir()), None)


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path
