"""Which files are images and which names are never walked into: the rules indexing and evaluation share."""

from __future__ import annotations

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
