"""Find image files under folders (which files count, and caption files, are `retrieval.imaging` rules).

Every path is canonical (`canonical`: absolute, `..` folded, symlinks resolved), so one file reached by
two spellings (a relative path, a symlink, a caption row) is one item. Symlinked folders are followed,
each real folder once, so a link loop cannot make the walk run forever.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clipdex.retrieval.errors import InputError
from clipdex.retrieval.imaging.files import IMAGE_SUFFIXES, is_image_file, skipped
from clipdex.retrieval.paths import canonical

log = logging.getLogger(__name__)

IGNORE_FILE = ".clipdexignore"  # one glob a line (`#` comments), for the folder it is in and everything below


@dataclass(frozen=True)
class FileEntry:
    path: Path
    size: int
    mtime: float
    source: str


def _ignore_patterns(folder: Path) -> list[str]:
    try:
        lines = (folder / IGNORE_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _excluded(relative: str, name: str, patterns: list[tuple[str, str]]) -> bool:
    """Glob patterns as .gitignore reads them: one with a `/` matches the path relative to the folder whose pattern
    it is, one without matches the name; a trailing `/` is dropped (folders and files alike)."""
    for base, pattern in patterns:
        pattern = pattern.rstrip("/")
        if "/" in pattern:  # `base` is a folder above `relative`: its patterns only travel down
            if fnmatch.fnmatchcase(relative[len(base) :].lstrip("/"), pattern.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def walk_images(root: Path, exclude: tuple[str, ...] = (), unreadable: list[Path] | None = None) -> Iterator[Path]:
    """Canonical paths of the image files under the canonical folder `root`, in a stable (sorted) order.

    Symlinked folders are followed into their real folder, which is walked once however it is reached. Hidden and
    system folders and files are skipped (`SKIPPED_NAMES`), and so is what matches `exclude` (globs, relative to
    `root`) or a `.clipdexignore` file in a walked folder (relative to that folder)."""
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path, relative: str, patterns: list[tuple[str, str]]) -> Iterator[Path]:
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:  # unreadable or vanished folder: skip it, keep walking
            log.warning("skipping folder %s: %s", folder, e.strerror or e)
            if unreadable is not None:
                unreadable.append(folder)
            return
        patterns = patterns + [(relative, p) for p in _ignore_patterns(folder)]
        subfolders = []
        for entry in entries:
            rel = f"{relative}/{entry.name}" if relative else entry.name
            if skipped(entry.name) or _excluded(rel, entry.name, patterns):
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    subfolders.append((canonical(entry.path) if entry.is_symlink() else Path(entry.path), rel))
                elif is_image_file(Path(entry.name)):
                    yield canonical(entry.path) if entry.is_symlink() else Path(entry.path)
            except OSError:
                continue
        for sub, rel in subfolders:
            yield from walk(sub, rel, patterns)

    yield from walk(root, "", [("", p) for p in exclude])


def scan_root(root: Path, exclude: tuple[str, ...] = (), unreadable: list[Path] | None = None) -> Iterator[FileEntry]:
    """Stat every image at or under the canonical path `root` (a folder or one image file); folders that could not
    be listed are added to `unreadable`."""
    source = str(root)
    paths = walk_images(root, exclude, unreadable) if root.is_dir() else iter([root])
    for path in paths:
        entry = _stat(path, source)
        if entry is not None:
            yield entry


def check_roots(roots: list[Path]) -> None:
    """Refuse a root that is neither a folder nor an image file; say what to do instead."""
    for root in roots:
        if root.is_file() and not is_image_file(root):
            raise InputError(
                f"{root} is not an image file (extensions: {', '.join(sorted(IMAGE_SUFFIXES))}); "
                "pass caption files with --texts"
            )


def no_images_error(root: Path, exclude: tuple[str, ...] = ()) -> InputError:
    if not root.exists():
        return InputError(f"no such file or folder: {root}")
    if root.is_dir() and _any_image(root):
        rules = " or ".join([f"--exclude {' '.join(repr(p) for p in exclude)}"] * bool(exclude) + [".clipdexignore"])
        return InputError(f"every image file under {root} is excluded (by {rules}, or a hidden or system folder)")
    return InputError(f"no image files under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")


def _any_image(root: Path) -> bool:
    """Whether any image file is under `root`, whatever is excluded: the first one found ends the walk."""
    return any(is_image_file(Path(f)) for _, _, files in os.walk(root) for f in files)


def _stat(path: Path, source: str) -> FileEntry | None:
    try:
        st = path.stat()
    except OSError as e:  # dangling symlink or vanished between listing and stat
        log.warning("skipping %s: %s", path, e.strerror or e)
        return None
    if not path.is_file():
        return None
    return FileEntry(path=path, size=st.st_size, mtime=st.st_mtime, source=source)
