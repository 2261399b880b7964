"""Atomic file replacement: a temp file beside the target, fsync, rename, fsync the folder.

A crash at any moment leaves either the old file or the new one, never a mix. Every file clipdex replaces goes
through here: index files durably (fsync), caches without fsync (a lost write only costs doing it again), and files
several processes may replace at once under a temp name of their own (`unique`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path, *, unique: bool = False) -> Path:
    """The temp file beside `path`; with `unique`, one per process and thread, so concurrent writers never share it."""
    tag = f".{os.getpid()}.{threading.get_ident()}" if unique else ""
    return path.with_name(f"{path.name}{tag}{TMP_SUFFIX}")


@contextmanager
def atomic_file(path: Path, *, durable: bool = True, unique: bool = False, mode: int = 0o666) -> Iterator[BinaryIO]:
    """Write `path` through a temp file; it replaces `path` only if the block finishes. `mode` is the new file's
    permission bits (before the umask): 0o600 for a file holding a secret."""
    tmp = temp_path(path, unique=unique)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _name(e, path)
        raise
    if durable:
        fsync_dir(path.parent)


def _name(e: BaseException, path: Path) -> None:
    """An OSError from a write, flush or fsync names no file; the one being replaced is the one to name."""
    if isinstance(e, OSError) and not e.filename:
        e.filename = str(path)


def atomic_write_bytes(
    path: Path, data: bytes, *, durable: bool = True, unique: bool = False, mode: int = 0o666
) -> None:
    with atomic_file(path, durable=durable, unique=unique, mode=mode) as f:
        f.write(data)


def replace_with(path: Path, write: Callable[[Path], object], *, durable: bool = True, unique: bool = False) -> None:
    """Replace `path` with what `write(temp path)` writes: for libraries that write a file by name (FAISS, DuckDB's
    COPY, torch.save, safetensors, a file copy)."""
    tmp = temp_path(path, unique=unique)
    try:
        write(tmp)
        if durable:
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _name(e, path)
        raise
    if durable:
        fsync_dir(path.parent)
