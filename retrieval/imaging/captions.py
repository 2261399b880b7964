"""Caption corpora (.txt, .csv, .tsv, .jsonl, .parquet): checked, their columns resolved, read row by row.

Indexing, evaluation and fine-tuning read caption files through this one reader. An image column's values are
read relative to the file's folder and made canonical; a bad row is a row with an error, never a stopped read.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from clipdex.retrieval.errors import InputError
from clipdex.retrieval.paths import canonical

TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
DEFAULT_TEXT_COLUMNS = ("caption", "text")
DEFAULT_IMAGE_COLUMN = "image"


@dataclass(frozen=True)
class TextRow:
    """One caption. `image` is the canonical path its row names, whether or not the file exists."""

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


def open_texts(
    path: Path, *, text_column: str | None = None, image_column: str | None = None, require_images: bool = True
) -> TextSource:
    """Check a caption file and resolve its columns; raise InputError with the fix otherwise.

    With `require_images`, a file whose image column names no existing file is refused: its paths are
    almost certainly read against the wrong folder."""
    if not path.is_file():
        raise InputError(f"caption file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise InputError(f"unsupported caption file {path}: use one of {', '.join(TEXT_SUFFIXES)}")
    try:
        with path.open("rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise InputError(f"cannot read caption file {path}: {e.strerror or e}") from e
    if suffix != ".parquet" and not _looks_like_text(head):
        raise InputError(f"{path} is not a text file (it holds binary data): give a {suffix} caption file")
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
    if image_column and require_images:
        _check_some_images_exist(source)
    return source


def _looks_like_text(head: bytes) -> bool:
    """No NUL byte and few control characters: what `file` calls text (any 8-bit encoding passes; the reader decodes
    UTF-8 and keeps other bytes as they are)."""
    if b"\x00" in head:
        return False
    controls = sum(1 for b in head if b < 32 and b not in b"\t\n\r\f\x08\x1b")
    return controls <= len(head) // 20


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
        yield from _read_parquet(path, columns)
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
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:  # e.g. a field over csv.field_size_limit: that row is bad, the rest are read
                    yield reader.line_num, {"__error__": f"unreadable row ({e})"}
                    continue
                yield reader.line_num, dict(values)


def _read_parquet(path: Path, columns: list[str]) -> Iterator[tuple[int, dict[str, object]]]:
    """Rows row group by row group: a corrupt group is one bad row naming the lines lost, not a stopped run."""
    pf = pq.ParquetFile(path)
    line = 0
    for group in range(pf.num_row_groups):
        size = pf.metadata.row_group(group).num_rows
        try:
            rows = [v for batch in pf.iter_batches(columns=columns, row_groups=[group]) for v in batch.to_pylist()]
        except Exception as e:  # arrow raises several types for corrupt pages
            yield line + 1, {"__error__": f"row group {group} (rows {line + 1}-{line + size}) is unreadable: {e}"}
            line += size
            continue
        for values in rows:
            line += 1
            yield line, values


def _make_row(line: int, values: dict[str, object], text_column: str, image_column: str | None, base: Path) -> TextRow:
    if "__error__" in values:
        return TextRow(line, "", None, str(values["__error__"]))
    text = values.get(text_column)
    image_value = values.get(image_column) if image_column else None
    image = None
    if isinstance(image_value, str) and image_value.strip():
        if _has_surrogates(image_value):
            return TextRow(line, "", None, "not valid UTF-8")
        image = canonical(base / image_value.strip())  # an absolute value replaces the base
    if not isinstance(text, str) or not text.strip():
        return TextRow(line, "", image, "empty text")
    if _has_surrogates(text):
        return TextRow(line, "", None, "not valid UTF-8")
    return TextRow(line, text, image)


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
