"""Reading the published snapshot: its item table, looked up by id, and the stored vectors of any ids.

Readers never need the writer's files and never write: they open what manifest.json names (checksums verified),
and a file that a newer publish has since removed surfaces as FileNotFoundError, so the caller can reopen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from clipdex.retrieval.config import Kind, sha256_file
from clipdex.retrieval.errors import IndexFormatError, ItemNotFoundError
from clipdex.retrieval.paths import under_prefix
from clipdex.retrieval.store.columns import equals, integers, numbers
from clipdex.retrieval.store.manifest import MANIFEST, Manifest
from clipdex.retrieval.store.shards import LiveVectors, gather, shard_path
from clipdex.retrieval.store.snapshot import ITEMS, parquet_columns, read_parquet

HIT_COLUMNS = ("id", "kind", "path", "text", "status", "shard", "row")
_OPTIONAL_COLUMNS = ("hash", "size", "link", "ocr")
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
        raise IndexFormatError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); rebuild the index") from e


def verify(index_dir: Path, files: dict[str, str], checksums: dict[str, str]) -> None:
    """Refuse damaged snapshot files rather than return silently wrong results."""
    for key, name in files.items():
        path = index_dir / name
        small = path.is_file() and path.stat().st_size < _VERIFY_BELOW
        if key in checksums and small and sha256_file(path) != checksums[key]:
            raise IndexFormatError(f"{path} is damaged (checksum mismatch); run `clipdex check` and rebuild the index")


def read_items(
    path: Path, columns: tuple[str, ...] = HIT_COLUMNS, optional: tuple[str, ...] = _OPTIONAL_COLUMNS
) -> Any:
    """The snapshot's item table (every row, failed ones too) with these columns and whichever of the `optional`
    ones it has (older formats lack some); an image's `text` is its first linked caption."""
    names = parquet_columns(path)
    wanted = list(columns) + [c for c in optional if c in names and c not in columns]
    caption = "text" in wanted and "caption" in names
    table = read_parquet(path, columns=wanted + (["caption"] if caption else []))
    if caption:  # format 1 stored the caption in `text` already
        text = pc.if_else(equals(table["kind"], Kind.IMAGE.value), table["caption"], table["text"])
        table = table.set_column(wanted.index("text"), "text", text).drop_columns(["caption"])
    return table


def read_locations(index_dir: Path, manifest: Manifest, kind: Kind, load: Any) -> LiveVectors | None:
    """The live vectors of one kind as the published snapshot has them, or None without a snapshot."""
    name = manifest.snapshot.files.get(ITEMS)
    if not name or not (index_dir / name).is_file():
        return None
    try:
        table = read_items(index_dir / name, ("id", "kind", "status", "shard", "row"), optional=())
    except Exception:  # a damaged snapshot: build afresh instead of updating it
        return None
    table = table.filter(pc.and_(equals(table["kind"], kind.value), equals(table["status"], "ok")))
    ids, shards, rows = (numbers(table[c]).astype(np.int64) for c in ("id", "shard", "row"))
    return LiveVectors(ids, shards, rows, load, manifest.dim)


@dataclass
class PublishedItems:
    """The searchable (status ok) items of one published snapshot, sorted by id, and their stored vectors.

    Only the cache of memory-mapped shards changes after opening; two threads may both map a shard, either kept."""

    index_dir: Path
    dim: int
    table: Any  # a pyarrow Table, or None for a snapshot without items
    ids: np.ndarray
    shard: np.ndarray
    row: np.ndarray
    _shards: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def open(cls, index_dir: Path, manifest: Manifest) -> PublishedItems:
        name = manifest.snapshot.files.get(ITEMS)
        empty = np.zeros(0, dtype=np.int64)
        if not name:
            return cls(index_dir, manifest.dim, None, empty, empty, empty)
        table = read_file(index_dir / name, read_items)
        table = table.filter(equals(table["status"], "ok"))
        ids, shards, rows = (numbers(table[c]) for c in ("id", "shard", "row"))
        return cls(index_dir, manifest.dim, table, ids, shards, rows)

    def of_kind(self, kind: Kind) -> np.ndarray:
        """Ids of the items of a kind, ascending."""
        if self.table is None:
            return np.zeros(0, dtype=np.int64)
        return numbers(self.table["id"].filter(equals(self.table["kind"], kind.value)))

    def position(self, item_id: int) -> int:
        pos = int(np.searchsorted(self.ids, item_id))
        if pos >= len(self.ids) or int(self.ids[pos]) != item_id:
            raise ItemNotFoundError(f"no item with id {item_id} in this index")
        return pos

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the item table holding `ids`; an id the table lacks means the snapshot is damaged."""
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
        if not len(ids):
            return []
        return self.table.take(integers(self.positions(np.asarray(ids, dtype=np.int64)))).to_pylist()

    def _shard(self, shard: int) -> np.ndarray:
        vectors = self._shards.get(shard)
        if vectors is None:
            vectors = read_file(
                shard_path(self.index_dir, shard), lambda p: np.load(p, mmap_mode="r", allow_pickle=False)
            )
            self._shards[shard] = vectors
        return vectors


def ids_under(table: Any, folders: list[str]) -> frozenset[int]:
    """Ids of the images of an item table whose file is at or under one of the canonical `folders` (a caption
    linked to one is not: its text is in a caption file)."""
    if not folders or table is None:
        return frozenset()
    paths = table["path"]
    hit = None
    for folder in folders:
        here = pc.or_(equals(paths, folder), pc.starts_with(paths, under_prefix(folder)))
        hit = here if hit is None else pc.or_(hit, here)
    hit = pc.and_(equals(table["kind"], "image"), hit)  # a null (no path) is not a hit: filter drops it
    return frozenset(int(i) for i in table["id"].filter(hit).to_pylist())
