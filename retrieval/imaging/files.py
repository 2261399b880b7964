"""Which files are images and which names are never walked into: the rules indexing and evaluation share."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
# Never walked into or indexed: hidden files and folders (`.git`, `.thumbnails`, macOS `._*` forks), NAS and
# system folders of thumbnails and deleted files. A root given by name is indexed whatever its name.
SKIPPED_NAMES = frozenset(
    {"@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information", "lost+found"}
)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def skipped(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_NAMES


class NotRegularFile(OSError):
    """A FIFO, socket, device or folder where a photo was expected: never opened as one (a FIFO's open or read
    blocks until a writer comes, and anyone who can write to a shared folder can make one)."""


def open_regular(path: Path | str, *, follow: bool = True) -> tuple[int, os.stat_result]:
    """An open descriptor on a regular file, and its status; the caller closes it. Checked before the open (so a
    device is never opened) and after it (the name may have been replaced between), with O_NONBLOCK so that a FIFO
    swapped in cannot block the open."""
    st = os.stat(path, follow_symlinks=follow)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(errno.EINVAL, f"not a regular file ({_kind(st.st_mode)})", str(path))
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({_kind(st.st_mode)})", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular(path: Path | str, limit: int) -> tuple[bytes, os.stat_result]:
    """A regular file's bytes and its status; nothing is read of a file over `limit` bytes (the status says its
    size), and at most `limit` + 1 of one that grows while it is read."""
    fd, st = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return (f.read(limit + 1) if st.st_size <= limit else b""), st


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"
