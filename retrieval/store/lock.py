"""The one-writer rule: an exclusive flock on write.lock, which the kernel drops when its holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from clipdex.retrieval.errors import IndexLockedError, disk_error

LOCK = "write.lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _release_in_child() -> None:
    """A forked child (a decode worker) inherits the lock's descriptor, and with it the lock: a worker that outlives
    its killed parent by a few seconds would keep the index locked. The child points its copy at /dev/null (the
    number stays valid for whatever closes it later); the parent's lock is untouched."""
    if not _HELD:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _HELD:
        os.dup2(null, fd)
    os.close(null)
    _HELD.clear()


os.register_at_fork(after_in_child=_release_in_child)


class WriteLock:
    """The exclusive right to write an index directory (or read its catalog), held until `close`."""

    def __init__(self, f: TextIO):
        self._f = f
        _HELD.add(f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            _HELD.discard(self._f.fileno())
        self._f.close()


def acquire_lock(index_dir: Path, *, holder: str = "") -> WriteLock:
    """Take the lock at once or raise IndexLockedError naming who holds it. The lock file says who we are."""
    path = index_dir / LOCK
    try:
        f = path.open("a+")
    except OSError as e:  # a read-only folder, a full disk: one line that says so
        raise (disk_error(e, path) or e) from e
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise IndexLockedError(f"{path.parent} is being written by {who}; wait for it to finish") from e
    f.seek(0)
    f.truncate()
    f.write(f"{holder + ' ' if holder else ''}pid {os.getpid()}\n")
    f.flush()
    return WriteLock(f)


@contextlib.contextmanager
def held(path: Path) -> Iterator[bool]:
    """Wait for an exclusive flock on `path` (made if missing) and hold it for the block; a child forked meanwhile
    drops its copy, as for the write lock. Where the file cannot be opened (a read-only folder) the block runs
    without it: yields whether the lock is held."""
    try:
        f = path.open("a")
    except OSError:
        yield False
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        lock = WriteLock(f)
    except BaseException:
        f.close()
        raise
    try:
        yield True
    finally:
        lock.close()
