"""Indexed image files for a viewer: opened only as an item's own path, thumbnails made once and cached.

The server reaches files only through here, and only by an item's stored path: canonical at index time, so a
path that now resolves elsewhere (a symlink put in its place or in a parent folder) is refused, as is anything
that is not a regular file or not an image. Thumbnails live in the user's cache, outside the index and its
published snapshot, keyed by path, size and mtime: an edited photo gets a new one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipdex.retrieval.errors import FileGoneError
from clipdex.retrieval.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    MAX_FILE_BYTES,
    ImageDecodeError,
    decode_image,
    register_heif,
)
from clipdex.retrieval.imaging.files import NotRegularFile, open_regular
from clipdex.retrieval.model.weights import cache_root, index_digest
from clipdex.retrieval.store.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 320  # longest side, pixels: a grid cell on a high-density screen
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ItemFile:
    path: Path
    size: int
    mtime_ns: int
    media_type: str

    @property
    def etag(self) -> str:
        return _key(self.path, self.size, self.mtime_ns, "file")


def thumbnail_dir(index_dir: Path) -> Path:
    """Where one index's thumbnails are cached: per index, by the index's canonical path."""
    return cache_root() / "thumbnails" / index_digest(index_dir)


def open_item_file(path: str) -> tuple[ItemFile, int]:
    """Open an item's stored path for reading; returns its description and an open descriptor (caller closes)."""
    p = Path(path)
    if not p.is_absolute() or os.path.realpath(p) != str(p):
        raise FileGoneError(f"{path} is not where it was indexed")
    try:
        fd, st = open_regular(p, follow=False)
    except NotRegularFile:
        raise FileGoneError(f"{path} is not an image file (not a regular file)") from None
    except OSError as e:
        raise FileGoneError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        if st.st_size > MAX_FILE_BYTES:
            raise FileGoneError(f"{path} is not an image file")
        head = os.pread(fd, 1 << 16, 0)
        media_type = _media_type(head, st.st_size, fd)
        return ItemFile(p, st.st_size, st.st_mtime_ns, media_type), fd
    except BaseException:
        os.close(fd)
        raise


def _media_type(head: bytes, size: int, fd: int) -> str:
    """The image's MIME type from its content; refuse what PIL cannot identify as an image."""
    register_heif()
    for data in (head, None):
        if data is None:
            if size <= len(head):
                break
            data = _read_all(fd, size)  # a format whose header is not at the start (some TIFFs)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return Image.MIME.get(img.format or "", "application/octet-stream")
        except Exception:
            continue
    raise FileGoneError("the file is no longer an image")


def _chunks(fd: int, size: int) -> Iterator[bytes]:
    for off in range(0, size, _CHUNK):
        yield os.pread(fd, min(_CHUNK, size - off), off)


def _read_all(fd: int, size: int) -> bytes:
    return b"".join(_chunks(fd, size))


def iter_file(fd: int, size: int) -> Iterator[bytes]:
    """The file's bytes in chunks, then the descriptor closed (for a streamed response)."""
    try:
        yield from _chunks(fd, size)
    finally:
        os.close(fd)


def thumbnail(
    path: str,
    *,
    cache: Path | None,
    size: int = THUMBNAIL_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[bytes, str]:
    """A JPEG at most `size` pixels on its longest side, and its ETag; from the cache when it is there."""
    info, fd = open_item_file(path)
    key = _key(info.path, info.size, info.mtime_ns, f"thumb{size}")
    cached = cache / key[:2] / f"{key}.jpg" if cache is not None else None
    try:
        if cached is not None and cached.is_file():
            return cached.read_bytes(), key
        data = _read_all(fd, info.size)
    finally:
        os.close(fd)
    try:
        img = decode_image(data, max_pixels=max_pixels, draft=(size, size)).image
    except ImageDecodeError as e:
        raise FileGoneError(f"{path}: {e}") from None
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, optimize=True)
    jpeg = buf.getvalue()
    if cached is not None:
        try:
            _write_cache(cached, jpeg)
        except OSError as e:  # a read-only or full cache costs speed, not answers
            log.warning("cannot cache thumbnails in %s: %s", cached.parent, e.strerror or e)
    return jpeg, key


def _write_cache(path: Path, data: bytes) -> None:
    """No fsync (a cache); the temp name is per thread, so two requests never collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, durable=False, unique=True)


def _key(path: Path, size: int, mtime_ns: int, what: str) -> str:
    return hashlib.blake2b(f"{what}\0{path}\0{size}\0{mtime_ns}".encode(), digest_size=16).hexdigest()
