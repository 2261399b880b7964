"""`clipdex check --repair`: a consistent index again from what is intact, and an account of what was lost.

- An unreadable catalog is moved aside and rebuilt from the published snapshot's item table (a full copy
  of the rows as of that generation).
- Items whose vectors sit in a missing, damaged or short shard are dropped (re-indexing encodes them again);
  a sound shard the catalog forgot to register is registered.
- Duplicate rows (one id, one image path or one caption row listed twice) keep their newest copy.
- The ANN indexes and the snapshot are rebuilt from the result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from clipdex.retrieval.ann.build import index_writer
from clipdex.retrieval.errors import IndexFormatError
from clipdex.retrieval.maintain.check import inspect_shard
from clipdex.retrieval.store.catalog import CATALOG, Catalog
from clipdex.retrieval.store.lock import acquire_lock
from clipdex.retrieval.store.manifest import Manifest, read_manifest
from clipdex.retrieval.store.shards import load_shard, shard_path
from clipdex.retrieval.store.snapshot import ITEMS
from clipdex.retrieval.store.writer import IndexWriter

log = logging.getLogger(__name__)


@dataclass
class RepairReport:
    actions: list[str] = field(default_factory=list)  # what was done
    lost: list[str] = field(default_factory=list)  # what is gone, and how to get it back

    def to_json(self) -> dict[str, Any]:
        return {"actions": self.actions, "lost": self.lost}


def repair_index(index_dir: Path) -> RepairReport:
    manifest = read_manifest(index_dir)
    report = RepairReport()
    lock = acquire_lock(index_dir, holder="clipdex check --repair")
    try:
        _ensure_catalog(index_dir, manifest, report)
        writer = index_writer(index_dir, manifest.model, manifest.dim, lock=lock)
    except BaseException:
        lock.close()
        raise
    try:
        _drop_unreadable_vectors(writer, report)
        _drop_duplicates(writer, report)
        writer.publish(rebuild=True)
        report.actions.append(f"rebuilt the ANN indexes and published generation {writer.manifest.snapshot.generation}")
    finally:
        writer.close()
    return report


def _ensure_catalog(index_dir: Path, manifest: Manifest, report: RepairReport) -> None:
    path = index_dir / CATALOG
    try:
        catalog = Catalog(index_dir)
        try:
            catalog.scalar("SELECT count(*) FROM items")
            catalog.scalar("SELECT count(*) FROM shards")
            return
        finally:
            catalog.close()
    except duckdb.Error as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    items = index_dir / manifest.snapshot.files.get(ITEMS, "")
    if not manifest.snapshot.files.get(ITEMS) or not items.is_file():
        raise IndexFormatError(
            f"{path} cannot be read ({reason}) and no published snapshot holds a copy of its rows: nothing to rebuild "
            "from; index your folders again into a new --index directory"
        )
    aside = path.with_name(f"{CATALOG}.damaged-{int(time.time())}")
    path.rename(aside)
    wal = path.with_name(CATALOG + ".wal")
    if wal.exists():
        wal.rename(aside.with_name(aside.name + ".wal"))
    catalog = Catalog(index_dir)
    try:
        n = catalog.restore(items)
        for shard in sorted(catalog.used_shards()):
            _register(catalog, index_dir, shard)
    except Exception as e:
        catalog.close()
        raise IndexFormatError(
            f"cannot rebuild the catalog from {items.name}: {e}; index again into a new directory"
        ) from e
    catalog.close()
    report.actions.append(
        f"{CATALOG} could not be read ({reason}): moved it to {aside.name} and rebuilt it from snapshot "
        f"generation {manifest.snapshot.generation} ({n} items)"
    )
    report.lost.append(
        f"changes committed after generation {manifest.snapshot.generation} was published, if any: "
        "run `clipdex index` on your folders and caption files to redo them"
    )


def _register(catalog: Catalog, index_dir: Path, shard: int) -> None:
    from clipdex.retrieval.config import sha256_file

    path = shard_path(index_dir, shard)
    try:
        rows = len(load_shard(path))
    except IndexFormatError:
        return  # missing or unreadable: its items are dropped next
    catalog.con.execute("INSERT INTO shards VALUES (?, ?, ?)", [shard, rows, sha256_file(path)])


def _drop_unreadable_vectors(writer: IndexWriter, report: RepairReport) -> None:
    catalog = writer.catalog
    registered = catalog.registered_shards()
    bad: dict[int, str] = {}
    lengths: dict[int, int] = {}
    for shard in sorted(catalog.used_shards()):
        problem, data = inspect_shard(writer.dir, shard, registered, writer.dim)
        if problem and "not registered" in problem:
            _register(catalog, writer.dir, shard)
            problem, data = inspect_shard(writer.dir, shard, catalog.registered_shards(), writer.dim)
            if problem is None:
                report.actions.append(f"registered vector shard {shard_path(writer.dir, shard).name}")
        if problem or data is None:
            bad[shard] = problem or "unreadable"
        else:
            lengths[shard] = len(data)
    rows = catalog.con.execute("SELECT id, kind, shard, row FROM items WHERE shard IS NOT NULL").fetchall()
    doomed = [(int(i), k) for i, k, s, r in rows if int(s) in bad or not 0 <= int(r) < lengths.get(int(s), 0)]
    if not doomed:
        return
    catalog.commit([], delete_ids=[i for i, _ in doomed])
    images = sum(k == "image" for _, k in doomed)
    why = (
        "; ".join(f"{shard_path(writer.dir, s).name}: {p}" for s, p in sorted(bad.items())[:3])
        or "rows past a shard's end"
    )
    report.lost.append(
        f"{images} images and {len(doomed) - images} texts whose vectors could not be read ({why}): run `clipdex "
        "index` on their folders and caption files to encode them again"
    )


# (rows concerned, what makes two of them the same item): one id, one image file, one caption row of a caption
# file (imported texts carry no hash: they are told apart by their row in the import, not by content)
_IDENTITIES = (
    ("TRUE", "id"),
    ("kind = 'image' AND path IS NOT NULL", "path"),
    ("kind = 'text' AND hash IS NOT NULL", "source, text, link"),
)


def _drop_duplicates(writer: IndexWriter, report: RepairReport) -> None:
    catalog = writer.catalog
    before = int(catalog.scalar("SELECT count(*) FROM items"))
    for where, key in _IDENTITIES:
        catalog.con.execute(
            f"""DELETE FROM items WHERE {where} AND rowid NOT IN (
                    SELECT arg_max(rowid, updated) FROM items WHERE {where} GROUP BY {key})"""
        )
    removed = before - int(catalog.scalar("SELECT count(*) FROM items"))
    if removed:
        report.actions.append(f"removed {removed} duplicate catalog rows (kept the newest of each)")
