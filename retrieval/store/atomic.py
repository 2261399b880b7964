"""Atomic file writes: a temp file beside the target, fsync, rename, fsync the folder.

A crash at any moment leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write `path` through a temp file; it replaces `path` only if the block finishes."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with tmp.open("wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def finish_tmp(tmp: Path, path: Path) -> None:
    """Make a temp file that a library wrote by name (FAISS, DuckDB's COPY) durable, then rename it."""
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
