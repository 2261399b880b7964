"""Find image files under folders and read caption corpora (.txt, .csv, .tsv, .jsonl, .parquet).

Symlinks: a symlink to a file is indexed under the link's own path; symlinked folders are not
descended into, so a link loop cannot make the walk run forever.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from clipdex.retrieval.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
DEFAULT_TEXT_COLUMNS = ("caption", "text")
DEFAULT_IMAGE_COLUMN = "image"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class FileEntry:
    path: Path
    size: int
    mtime: float
    source: str


def walk_images(root: Path) -> Iterator[Path]:
    """Image files under `root`, in a stable (sorted) order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_image_file(path):
                yield path


def scan_roots(roots: list[Path]) -> Iterator[FileEntry]:
    """Stat every image under the given folders and files. Raise on a missing or empty root."""
    for root in roots:
        source = str(root)
        if root.is_dir():
            found = False
            for path in walk_images(root):
                entry = _stat(path, source)
                if entry is not None:
                    found = True
                    yield entry
            if not found:
                raise InputError(f"no image files under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        else:
            entry = _stat(root, source)
            if entry is not None:
                yield entry


def check_roots(roots: list[Path]) -> None:
    for root in roots:
        if not root.exists():
            raise InputError(f"no such file or folder: {root}")
        if root.is_file() and not is_image_file(root):
            raise InputError(
                f"{root} is not an image file (extensions: {', '.join(sorted(IMAGE_SUFFIXES))}); "
                "pass caption files with --texts"
            )


def _stat(path: Path, source: str) -> FileEntry | None:
    try:
        st = path.stat()
    except OSError as e:  # dangling symlink or vanished between listing and stat
        log.warning("skipping %s: %s", path, e)
        return None
    if not path.is_file():
        return None
    return FileEntry(path=path, size=st.st_size, mtime=st.st_mtime, source=source)


# -- caption corpora -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TextRow:
    line: int
    text: str
    image: Path | None
    error: str | None = None


@dataclass(frozen=True)
class TextSource:
    """A caption file with its resolved columns. Iterate it for rows; nothing is loaded whole."""

    path: Path
    text_column: str | None
    image_column: str | None

    def __iter__(self) -> Iterator[TextRow]:
        suffix = self.path.suffix.lower()
        raw = _read_txt(self.path) if suffix == ".txt" else _read_table(self.path, suffix, self._columns())
        base = self.path.parent
        for line, values in raw:
            yield _make_row(line, values, self.text_column or "text", self.image_column, base)

    def _columns(self) -> list[str]:
        return [c for c in (self.text_column, self.image_column) if c]


def open_texts(path: Path, *, text_column: str | None = None, image_column: str | None = None) -> TextSource:
    """Check a caption file and resolve its columns; raise InputError with the fix otherwise."""
    if not path.is_file():
        raise InputError(f"caption file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise InputError(f"unsupported caption file {path}: use one of {', '.join(TEXT_SUFFIXES)}")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise InputError(f"cannot read caption file {path}: {e.strerror or e}") from e
    if suffix == ".txt":
        if image_column:
            raise InputError(f"{path} is plain text (one caption per line) and has no image column")
        return TextSource(path, None, None)
    columns = _header(path, suffix)
    if text_column is None:
        text_column = next((c for c in DEFAULT_TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise InputError(
                f"{path} has no 'caption' or 'text' column (columns: {', '.join(columns)}); name one with --text-column"
            )
    elif text_column not in columns:
        raise InputError(f"{path} has no column {text_column!r} (columns: {', '.join(columns)})")
    if image_column is None:
        image_column = DEFAULT_IMAGE_COLUMN if DEFAULT_IMAGE_COLUMN in columns else None
    elif image_column not in columns:
        raise InputError(f"{path} has no column {image_column!r} (columns: {', '.join(columns)})")
    source = TextSource(path, text_column, image_column)
    if image_column:
        _check_some_images_exist(source)
    return source


def _check_some_images_exist(source: TextSource, sample: int = 1000) -> None:
    # A few missing images are bad rows; none found at all means the paths are wrong.
    seen, missing = 0, []
    for row in source:
        if row.image is None:
            continue
        seen += 1
        if not row.image.is_file():
            missing.append(row.image)
        if seen >= sample:
            break
    if seen and len(missing) == seen:
        raise InputError(
            f"none of the image paths in {source.path} exist (e.g. {missing[0]}); "
            f"paths in column {source.image_column!r} are read relative to {source.path.parent}"
        )


def _header(path: Path, suffix: str) -> list[str]:
    try:
        if suffix == ".parquet":
            return list(pq.ParquetFile(path).schema_arrow.names)
        if suffix == ".jsonl":
            with path.open("rb") as f:
                for raw in f:
                    if raw.strip():
                        obj = json.loads(raw)
                        if not isinstance(obj, dict):
                            raise InputError(f"{path}: each line must be a JSON object")
                        return list(obj)
            raise InputError(f"caption file {path} is empty")
        with _text_stream(path) as f:
            header = next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), None)
        if not header:
            raise InputError(f"caption file {path} is empty")
        return header
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read caption file {path}: {e}") from e


def _text_stream(path: Path) -> io.TextIOWrapper:
    # surrogateescape keeps a bad byte from stopping the file; the row holding it is reported
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _read_txt(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    with _text_stream(path) as f:
        for line, text in enumerate(f, start=1):
            if text.strip():
                yield line, {"text": text.rstrip("\r\n")}


def _read_table(path: Path, suffix: str, columns: list[str]) -> Iterator[tuple[int, dict[str, object]]]:
    if suffix == ".parquet":
        line = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=8192):
            for values in batch.to_pylist():
                line += 1
                yield line, values
    elif suffix == ".jsonl":
        with _text_stream(path) as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    yield line, {"__error__": f"not valid JSON: {e.msg}"}
                    continue
                yield line, obj if isinstance(obj, dict) else {"__error__": "not a JSON object"}
    else:
        with _text_stream(path) as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for values in reader:
                yield reader.line_num, dict(values)


def _make_row(line: int, values: dict[str, object], text_column: str, image_column: str | None, base: Path) -> TextRow:
    if "__error__" in values:
        return TextRow(line, "", None, str(values["__error__"]))
    text = values.get(text_column)
    image_value = values.get(image_column) if image_column else None
    image = None
    if isinstance(image_value, str) and image_value.strip():
        image = Path(image_value.strip())
        image = image if image.is_absolute() else base / image
    if not isinstance(text, str) or not text.strip():
        return TextRow(line, "", image, "empty text")
    if _has_surrogates(text) or (isinstance(image_value, str) and _has_surrogates(image_value)):
        return TextRow(line, "", None, "not valid UTF-8")
    if image is not None and not image.is_file():
        return TextRow(line, text, image, f"image not found: {image}")
    return TextRow(line, text, image)


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
