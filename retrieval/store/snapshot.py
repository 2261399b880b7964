"""Publishing: turn the committed catalog into an immutable, checksummed snapshot that readers open.

A snapshot of generation G is `images-G.faiss`, `texts-G.faiss`, `items-G.parquet` (every catalog row) and
`words-G.sqlite` (full-text search over captions and the words read in images: store/words.py), and for an index
built on disk its inverted lists, `images-G.ivfdata`.
The new files are written first; replacing manifest.json makes them current; older generations are deleted
after. How each kind's ANN index is chosen and built is not decided here: the writer is handed an
`IndexBuilder` (retrieval.build), so storage knows files, not index policy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq

from clipdex.retrieval.config import Kind, sha256_file
from clipdex.retrieval.store.atomic import TMP_SUFFIX, replace_with
from clipdex.retrieval.store.manifest import MANIFEST, AnnRecord, AnnSettings, Manifest
from clipdex.retrieval.store.shards import LiveVectors
from clipdex.retrieval.store.words import SUFFIX as WORDS_SUFFIX
from clipdex.retrieval.store.words import WORDS

ITEMS = "items"
# the item table's key-value metadata: the manifest that published it, and the shards its rows read (with their
# checksums), so that a lost manifest or catalog is rebuilt whole
MANIFEST_COPY = "clipdex.manifest"
SHARDS_COPY = "clipdex.shards"
LISTS_SUFFIX = ".ivfdata"  # an on-disk index's inverted lists (FAISS OnDiskInvertedLists)


@dataclass
class PreviousIndex:
    """The kind's index in the current snapshot, which a builder may update instead of re-training."""

    path: Path
    info: AnnRecord
    live: LiveVectors  # the vectors it was built from (ids and locations at that generation)


@dataclass
class BuiltIndex:
    index_type: str  # e.g. IndexFlat, IndexIVFFlat
    count: int
    info: AnnRecord  # how it was chosen and tuned (manifest "ann")
    lists: str | None = None  # the file of an on-disk index's inverted lists, beside `out`


class IndexBuilder(Protocol):
    def build(
        self,
        kind: Kind,
        live: LiveVectors,
        *,
        other: LiveVectors,
        previous: PreviousIndex | None,
        settings: AnnSettings | None,
        out: Path,
    ) -> BuiltIndex:
        """Write the ANN index over `live` to `out`; `other` is the other kind (a source of realistic queries)."""
        ...


def snapshot_name(kind_or_items: str, generation: int) -> str:
    suffix = {ITEMS: ".parquet", WORDS: WORDS_SUFFIX}.get(kind_or_items, ".faiss")
    return f"{kind_or_items}-{generation:06d}{suffix}"


def read_parquet(path: Path, columns: list[str] | None = None, dictionary: list[str] | None = None) -> Any:
    """A Parquet table read through a Python file: a read or close that fails is an OSError here, not a line
    Arrow's C++ writes to stderr itself when its own file handle fails to close. `ParquetFile` rather than
    `read_table`, which imports pyarrow.dataset and with it pandas: a fifth of a cold search's start. The
    `dictionary` columns are read dictionary-encoded."""
    with path.open("rb") as f:
        return pq.ParquetFile(f, read_dictionary=dictionary or None).read(columns=columns)


def parquet_columns(path: Path) -> list[str]:
    with path.open("rb") as f:
        return list(pq.read_schema(f).names)


def manifest_copy(manifest: Manifest) -> dict[str, str]:
    data = manifest.to_json()
    del data["snapshot"]  # the files are the ones beside it; their checksums are taken again
    return {MANIFEST_COPY: json.dumps(data)}


def shards_copy(registered: dict[int, tuple[int, str]]) -> dict[str, str]:
    return {SHARDS_COPY: json.dumps({str(s): [n, digest] for s, (n, digest) in sorted(registered.items())})}


def read_manifest_copy(path: Path) -> dict[str, Any] | None:
    """The manifest kept in an item table, or None where the file or its copy cannot be read."""
    data = _metadata(path, MANIFEST_COPY)
    return data if isinstance(data, dict) else None


def read_shards_copy(path: Path) -> dict[int, tuple[int, str]]:
    """The shard registry kept in an item table (empty where there is none: tables written before it was kept)."""
    data = _metadata(path, SHARDS_COPY)
    if not isinstance(data, dict):
        return {}
    try:
        return {int(s): (int(n), str(digest)) for s, (n, digest) in data.items()}
    except (TypeError, ValueError):
        return {}


def _metadata(path: Path, key: str) -> Any:
    try:
        with path.open("rb") as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        return json.loads(meta[key.encode()])
    except Exception:  # missing or damaged: the caller looks elsewhere
        return None


def snapshot_shards(index_dir: Path, manifest: Manifest) -> set[int] | None:
    """Shards the published snapshot reads: clean-up must keep them even when no committed row does.

    None when its item table cannot be read: then nobody can tell which shards it needs, so keep them all."""
    name = manifest.snapshot.files.get(ITEMS)
    if not name or not (index_dir / name).is_file():
        return set()
    try:
        shards = read_parquet(index_dir / name, columns=["shard"])["shard"].drop_null()
    except Exception:  # a damaged snapshot: `clipdex check` reports it
        return None
    return {int(s) for s in shards.unique().to_pylist()}


def write_index_files(
    index_dir: Path,
    manifest: Manifest,
    live: dict[Kind, LiveVectors],
    previous: dict[Kind, PreviousIndex | None],
    builder: IndexBuilder,
    export_items: Any,
    export_words: Any,
) -> tuple[dict[str, str], dict[str, str], dict[str, int], dict[str, AnnRecord]]:
    """Build generation G+1's files; return (files, index types, counts, ann info). Nothing is current yet."""
    generation = manifest.snapshot.generation + 1
    files: dict[str, str] = {}
    index_types: dict[str, str] = {}
    counts: dict[str, int] = {}
    ann: dict[str, AnnRecord] = {}
    for kind in Kind:
        other = live[Kind.TEXT if kind is Kind.IMAGE else Kind.IMAGE]
        name = snapshot_name(kind.plural, generation)
        built = builder.build(
            kind, live[kind], other=other, previous=previous[kind], settings=manifest.ann_settings, out=index_dir / name
        )
        files[kind.plural] = name
        if built.lists is not None:
            files[f"{kind.plural}_lists"] = built.lists
        index_types[kind.plural] = built.index_type
        counts[kind.plural] = built.count
        ann[kind.plural] = built.info
    items = snapshot_name(ITEMS, generation)
    replace_with(index_dir / items, export_items)
    files[ITEMS] = items
    words = snapshot_name(WORDS, generation)
    replace_with(index_dir / words, export_words)
    files[WORDS] = words
    return files, index_types, counts, ann


def make_current(manifest: Manifest, files: dict[str, str], index_dir: Path) -> None:
    """Point the manifest (in memory) at generation G+1's files, with their checksums."""
    manifest.snapshot.generation += 1
    manifest.snapshot.files = files
    manifest.snapshot.sha256 = {key: sha256_file(index_dir / name) for key, name in files.items()}
    manifest.snapshot.published = time.time()


def remove_stale(index_dir: Path, keep: set[str]) -> None:
    """Delete snapshot files of other generations, and temp files a crash left."""
    for p in index_dir.iterdir():
        stale = p.name.endswith(TMP_SUFFIX) or p.suffix in (".faiss", ".parquet", WORDS_SUFFIX, LISTS_SUFFIX)
        if p.is_file() and stale and p.name not in keep and p.name != MANIFEST:
            p.unlink(missing_ok=True)
