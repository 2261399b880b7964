"""Reading the published snapshot: its item table, looked up by id, and the stored vectors of any ids.

Readers never need the writer's files and never write: they open what manifest.json names (checksums verified),
and a file that a newer publish has since removed surfaces as FileNotFoundError, so the caller can reopen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.retrieval.config import Kind, sha256_file
from clipdex.retrieval.errors import IndexFormatError, ItemNotFoundError
from clipdex.retrieval.paths import under_prefix
from clipdex.retrieval.store.columns import equals, flags, integers, matches, numbers
from clipdex.retrieval.store.manifest import MANIFEST, Manifest
from clipdex.retrieval.store.shards import LiveVectors, gather, shard_path
from clipdex.retrieval.store.snapshot import ITEMS, parquet_columns, read_parquet

HIT_COLUMNS = ("id", "kind", "path", "text", "status", "shard", "row")
_OPTIONAL_COLUMNS = ("hash", "size", "link", "ocr")
_FEW_ROWS = 256  # more rows than this are taken at once (Table.take, which imports pyarrow.compute: 0.07 s)
_VERIFY_BELOW = 512 << 20  # larger files are left to `clipdex check`, so that opening stays fast


def manifest_stamp(index_dir: Path) -> tuple[int, int, int]:
    """What changes whenever the manifest is replaced (it is written to a new file and renamed)."""
    st = (index_dir / MANIFEST).stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_file(path: Path, reader: Any) -> Any:
    """`reader(path)`; a file that is gone stays FileNotFoundError, any other failure is a damaged index."""
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        return reader(path)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise IndexFormatError(
            f"{path} is damaged or truncated ({type(e).__name__}: {e}); repair it: `clipdex check --repair --index {path.parent}`"
        ) from e


def verify(index_dir: Path, files: dict[str, str], checksums: dict[str, str]) -> None:
    """Refuse damaged snapshot files rather than return silently wrong results."""
    for key, name in files.items():
        path = index_dir / name
        small = path.is_file() and path.stat().st_size < _VERIFY_BELOW
        if key in checksums and small and sha256_file(path) != checksums[key]:
            raise IndexFormatError(
                f"{path} is damaged (checksum mismatch); repair it: `clipdex check --repair --index {index_dir}`"
            )


def read_items(
    path: Path, columns: tuple[str, ...] = HIT_COLUMNS, optional: tuple[str, ...] = _OPTIONAL_COLUMNS
) -> Any:
    """The snapshot's item table (every row, failed ones too) with these columns and whichever of the `optional`
    ones it has (older formats lack some); an image's `text` is its first linked caption."""
    import pyarrow.compute as pc

    table = _read_item_columns(path, columns, optional, coded=False)
    if "caption" in table.column_names:  # format 1 stored the caption in `text` already
        text = pc.if_else(equals(table["kind"], Kind.IMAGE.value), table["caption"], table["text"])
        table = table.set_column(table.column_names.index("text"), "text", text).drop_columns(["caption"])
    return table


def _read_item_columns(path: Path, columns: tuple[str, ...], optional: tuple[str, ...], *, coded: bool) -> Any:
    """The columns `read_items` reads, `caption` too where an image's text is in it (format 2); `coded`: `kind` and
    `status` as dictionaries (a few values, compared on their codes: `columns.matches`)."""
    names = parquet_columns(path)
    wanted = list(columns) + [c for c in optional if c in names and c not in columns]
    caption = "text" in wanted and "caption" in names
    dictionary: list[str] = [c for c in ("kind", "status") if c in wanted] if coded else []
    return read_parquet(path, columns=wanted + (["caption"] if caption else []), dictionary=dictionary)


def _with_caption(row: dict[str, Any]) -> dict[str, Any]:
    if "caption" in row:
        caption = row.pop("caption")
        if row["kind"] == Kind.IMAGE.value:
            row["text"] = caption
    return row


def read_locations(index_dir: Path, manifest: Manifest, kind: Kind, load: Any) -> LiveVectors | None:
    """The live vectors of one kind as the published snapshot has them, or None without a snapshot."""
    name = manifest.snapshot.files.get(ITEMS)
    if not name or not (index_dir / name).is_file():
        return None
    try:
        table = read_items(index_dir / name, ("id", "kind", "status", "shard", "row"), optional=())
    except Exception:  # a damaged snapshot: build afresh instead of updating it
        return None
    import pyarrow.compute as pc

    table = table.filter(pc.and_(equals(table["kind"], kind.value), equals(table["status"], "ok")))
    ids, shards, rows = (numbers(table[c]).astype(np.int64) for c in ("id", "shard", "row"))
    return LiveVectors(ids, shards, rows, load, manifest.dim)


@dataclass
class PublishedItems:
    """The searchable (status ok) items of one published snapshot, sorted by id, and their stored vectors.

    `table` holds every row of the snapshot's item table, failed ones too; `at` is where each searchable item's row
    is in it. Opening it and looking up a page of rows use no Arrow compute function: pyarrow.compute takes 0.07 s
    to import, a tenth of a cold search. Only the cache of memory-mapped shards changes after opening; two threads
    may both map a shard, either kept."""

    index_dir: Path
    dim: int
    table: Any  # a pyarrow Table, or None for a snapshot without items
    ids: np.ndarray
    shard: np.ndarray
    row: np.ndarray
    at: np.ndarray  # each id's row in `table`
    kinds: dict[str, np.ndarray] = field(default_factory=dict)  # kind → which of `ids` are of it
    _shards: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def open(cls, index_dir: Path, manifest: Manifest) -> PublishedItems:
        name = manifest.snapshot.files.get(ITEMS)
        empty = np.zeros(0, dtype=np.int64)
        if not name:
            return cls(index_dir, manifest.dim, None, empty, empty, empty, empty)
        table = read_file(index_dir / name, lambda p: _read_item_columns(p, HIT_COLUMNS, _OPTIONAL_COLUMNS, coded=True))
        at = np.flatnonzero(matches(table["status"], "ok"))
        ids, shards, rows = (numbers(table[c], fill=-1)[at] for c in ("id", "shard", "row"))  # failed: no shard
        order = np.argsort(ids, kind="stable")  # the table is written in id order: this keeps it
        at, ids, shards, rows = at[order], ids[order], shards[order], rows[order]
        kinds = {k.value: matches(table["kind"], k.value)[at] for k in Kind}
        return cls(index_dir, manifest.dim, table, ids, shards, rows, at, kinds)

    def of_kind(self, kind: Kind) -> np.ndarray:
        """Ids of the items of a kind, ascending."""
        if self.table is None:
            return np.zeros(0, dtype=np.int64)
        return self.ids[self.kinds[kind.value]]

    def position(self, item_id: int) -> int:
        pos = int(np.searchsorted(self.ids, item_id))
        if pos >= len(self.ids) or int(self.ids[pos]) != item_id:
            raise ItemNotFoundError(f"no item with id {item_id} in this index")
        return pos

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Where `ids` are among the searchable items; an id missing means the snapshot is damaged."""
        pos = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        if len(ids) and (not len(self.ids) or not np.array_equal(self.ids[pos], ids)):
            raise IndexFormatError(
                f"{self.index_dir}: the FAISS index holds ids missing from the item table; run `clipdex check "
                f"--index {self.index_dir}`"
            )
        return pos

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored float32 vectors of the given ids, read from memory-mapped shards."""
        pos = self.positions(np.asarray(ids, dtype=np.int64))
        return gather(self.shard[pos], self.row[pos], self._shard, self.dim)

    def rows(self, ids: np.ndarray) -> list[dict[str, Any]]:
        """The item table's row of each id (HIT_COLUMNS and the optional columns the snapshot has); an image's
        `text` is its caption (format 2 keeps it apart)."""
        pos = self.positions(np.asarray(ids, dtype=np.int64))
        if len(pos) <= _FEW_ROWS:  # a page of hits: a slice each, no compute function to import
            return [self._row_at(int(p)) for p in pos]
        return [_with_caption(row) for row in self.table.take(integers(self.at[pos])).to_pylist()]

    def row_of(self, item_id: int) -> dict[str, Any]:
        """The row of one searchable item; an id the index does not hold is ItemNotFoundError."""
        return self._row_at(self.position(item_id))

    def _row_at(self, pos: int) -> dict[str, Any]:
        return _with_caption(self.table.slice(int(self.at[pos]), 1).to_pylist()[0])

    def _shard(self, shard: int) -> np.ndarray:
        vectors = self._shards.get(shard)
        if vectors is None:
            vectors = read_file(
                shard_path(self.index_dir, shard), lambda p: np.load(p, mmap_mode="r", allow_pickle=False)
            )
            self._shards[shard] = vectors
        return vectors


def ids_under(items: PublishedItems, folders: list[str]) -> frozenset[int]:
    """Ids of the searchable images whose file is at or under one of the canonical `folders` (a caption linked to
    one is not: its text is in a caption file)."""
    if not folders or items.table is None:
        return frozenset()
    import pyarrow.compute as pc

    paths = items.table["path"]
    hit = None
    for folder in folders:
        here = pc.or_(equals(paths, folder), pc.starts_with(paths, under_prefix(folder)))
        hit = here if hit is None else pc.or_(hit, here)
    under = flags(hit)[items.at] & items.kinds[Kind.IMAGE.value]  # a null (no path) is not under any
    return frozenset(int(i) for i in items.ids[under])
