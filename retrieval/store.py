"""The on-disk index format: manifest, catalog, vector shards and published snapshots.

Writers hold an exclusive lock and the DuckDB catalog. Readers never open the catalog: each
publish writes an immutable snapshot (one FAISS file per kind plus a parquet of item metadata,
named by generation) and then atomically replaces manifest.json, which names them. A reader
therefore sees one consistent generation even while an indexing run is committing.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from clipdex.retrieval import ann
from clipdex.retrieval.build import AnnSettings, LiveVectors, build_kind
from clipdex.retrieval.config import EncoderConfig, ModelSpec, sha256_file
from clipdex.retrieval.errors import IndexFormatError, IndexLockedError, IndexNotFoundError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CATALOG = "catalog.duckdb"
LOCK = "write.lock"
VECTORS = "vectors"
MODEL_DIR = "model"


class Kind(str, Enum):
    IMAGE = "image"
    TEXT = "text"

    @property
    def plural(self) -> str:
        return self.value + "s"


class Status(str, Enum):
    OK = "ok"
    FAILED = "failed"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id BIGINT NOT NULL,
    kind VARCHAR NOT NULL,
    source VARCHAR,
    path VARCHAR,
    text VARCHAR,
    size BIGINT,
    mtime DOUBLE,
    hash VARCHAR,
    width INTEGER,
    height INTEGER,
    status VARCHAR NOT NULL,
    error VARCHAR,
    shard INTEGER,
    row INTEGER,
    updated DOUBLE
)
"""
_SHARDS = """
CREATE TABLE IF NOT EXISTS shards (
    shard INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    sha256 VARCHAR NOT NULL
)
"""
COLUMNS = (
    "id",
    "kind",
    "source",
    "path",
    "text",
    "size",
    "mtime",
    "hash",
    "width",
    "height",
    "status",
    "error",
    "shard",
    "row",
    "updated",
)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def read_manifest(index_dir: Path) -> dict[str, Any]:
    if not index_dir.is_dir():
        raise IndexNotFoundError(
            f"index directory not found: {index_dir} (create one with `clipdex index PATH --index {index_dir}`)"
        )
    path = index_dir / MANIFEST
    if not path.is_file():
        raise IndexNotFoundError(f"{index_dir} holds no clipdex index (no {MANIFEST}); create one with `clipdex index`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{path} is damaged ({e}); rebuild the index") from e
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise IndexFormatError(f"{path} is not a clipdex manifest")
    version = manifest["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{index_dir} has index format {version}, newer than this clipdex reads ({FORMAT_VERSION}); upgrade clipdex"
        )
    return manifest


def index_encoder_config(index_dir: Path, *, device: str = "auto") -> tuple[EncoderConfig, ModelSpec]:
    """The encoder config that reloads the model an index was built with."""
    spec = ModelSpec.from_json(read_manifest(index_dir)["model"])
    model = str(index_dir / MODEL_DIR / f"{spec.name}.json") if spec.config is not None else spec.name
    return EncoderConfig(model=model, pretrained=spec.pretrained, device=device), spec


def snapshot_files(manifest: dict[str, Any]) -> dict[str, str]:
    return dict(manifest.get("snapshot", {}).get("files", {}))


@dataclass
class Record:
    """A catalog row to write. `vector` is set for new embeddings, (shard,row) for reused ones."""

    id: int
    kind: Kind
    source: str | None
    path: str | None
    text: str | None
    size: int | None = None
    mtime: float | None = None
    hash: str | None = None
    width: int | None = None
    height: int | None = None
    status: Status = Status.OK
    error: str | None = None
    vector: np.ndarray | None = None
    shard: int | None = None
    row: int | None = None


class IndexWriter:
    """Exclusive, transactional access to an index directory for one indexing run."""

    def __init__(self, index_dir: Path, spec: ModelSpec, dim: int, *, lock: WriteLock | None = None):
        self.dir = index_dir
        self.spec = spec
        self.dim = dim
        index_dir.mkdir(parents=True, exist_ok=True)
        (index_dir / VECTORS).mkdir(exist_ok=True)
        self._lock_file = lock or acquire_lock(index_dir)
        try:
            self.manifest = self._load_or_create_manifest()
            self.con = duckdb.connect(str(index_dir / CATALOG))
            self.con.execute(_SCHEMA)
            self.con.execute(_SHARDS)
            self._next_id = int(self.con.execute("SELECT COALESCE(MAX(id), -1) + 1 FROM items").fetchone()[0])  # type: ignore[index]
            self._next_shard = self._scan_next_shard()
            self._remove_orphans()
        except BaseException:
            self._lock_file.close()
            raise

    # -- ids, shards, lookups -------------------------------------------------------------------

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def rows(self, sql_where: str = "TRUE", params: list[Any] | None = None) -> list[dict[str, Any]]:
        cur = self.con.execute(f"SELECT {', '.join(COLUMNS)} FROM items WHERE {sql_where}", params or [])
        return [dict(zip(COLUMNS, r, strict=True)) for r in cur.fetchall()]

    # -- commit ---------------------------------------------------------------------------------

    def commit(self, records: list[Record], *, delete_ids: list[int] | None = None) -> None:
        """Write new vectors to one shard, then upsert rows and delete ids in one transaction.

        A crash before the transaction commits leaves at most an unreferenced shard file,
        which the next writer removes.
        """
        fresh = [r for r in records if r.vector is not None]
        new_shard: tuple[int, int, str] | None = None
        if fresh:
            shard = self._next_shard
            self._next_shard += 1
            stacked = np.stack([r.vector for r in fresh])  # type: ignore[misc]
            digest = _atomic_save_npy(self._shard_path(shard), stacked.astype(self._vector_dtype(fresh)))
            new_shard = (shard, len(fresh), digest)
            for row, r in enumerate(fresh):
                r.shard, r.row = shard, row
        now = time.time()
        touched = [r.id for r in records] + list(delete_ids or [])
        self.con.execute("BEGIN TRANSACTION")
        try:
            if new_shard is not None:
                self.con.execute("INSERT INTO shards VALUES (?, ?, ?)", list(new_shard))
            if touched:
                self.con.execute("DELETE FROM items WHERE id IN (SELECT unnest($1::BIGINT[]))", [touched])
            if records:
                rows = _records_table(records, now)  # noqa: F841 (read by DuckDB's replacement scan below)
                self.con.execute("INSERT INTO items SELECT * FROM rows")
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def set_ann_settings(self, settings: AnnSettings) -> None:
        """Index type, memory budget and target recall for this and later publishes."""
        self.manifest["ann_settings"] = settings.to_json()

    def _vector_dtype(self, fresh: list[Record]) -> type:
        """float32 while any kind in the shard is small enough for exact search (results must equal brute
        force); float16 once every kind in it has an approximate index anyway. Exact search is per kind."""
        adding = Counter(r.kind.value for r in fresh)
        live = dict(self.con.execute("SELECT kind, count(*) FROM items WHERE status = 'ok' GROUP BY kind").fetchall())
        exact = any(int(live.get(kind, 0)) + n <= ann.EXACT_MAX for kind, n in adding.items())
        return np.float32 if exact else np.float16

    def touch(self, updates: list[tuple[int, int, float]]) -> None:
        """Record a new size/mtime for files whose content hash did not change."""
        if not updates:
            return
        changes = pa.table(  # noqa: F841 (read by DuckDB's replacement scan below)
            {"id": [u[0] for u in updates], "size": [u[1] for u in updates], "mtime": [u[2] for u in updates]}
        )
        self.con.execute("BEGIN TRANSACTION")
        self.con.execute(
            "UPDATE items SET size = changes.size, mtime = changes.mtime FROM changes WHERE items.id = changes.id"
        )
        self.con.execute("COMMIT")

    # -- publish --------------------------------------------------------------------------------

    def publish(self, *, settings: AnnSettings | None = None, rebuild: bool = False) -> dict[str, Any]:
        """Build FAISS indexes from the committed catalog and make them the current snapshot.

        `settings` replace the stored ANN settings; `rebuild` re-trains even where the previous index could be
        updated in place.
        """
        if settings is not None:
            self.manifest["ann_settings"] = settings.to_json()
        current = AnnSettings.from_json(self.manifest.get("ann_settings"))
        generation = int(self.manifest["snapshot"]["generation"]) + 1
        old_files = snapshot_files(self.manifest)
        old_ann = self.manifest.get("ann", {})
        files: dict[str, str] = {}
        index_types: dict[str, str] = {}
        counts: dict[str, int] = {}
        ann_info: dict[str, Any] = {}
        live = {kind: self.live_vectors(kind) for kind in Kind}
        for kind in Kind:
            other = live[Kind.TEXT if kind is Kind.IMAGE else Kind.IMAGE]
            previous = None
            if not rebuild and kind.plural in old_files and (self.dir / old_files[kind.plural]).is_file():
                previous = ann.read_index(self.dir / old_files[kind.plural], mmap=False)
            index, info = build_kind(
                live[kind],
                current,
                previous=previous,
                previous_info=old_ann.get(kind.plural),
                queries=functools.partial(other.sample, min(1000, len(other)), np.random.default_rng(3)),
            )
            name = f"{kind.plural}-{generation:06d}.faiss"
            ann.write_index(index, self.dir / name)
            files[kind.plural] = name
            index_types[kind.plural] = ann.describe(index)
            counts[kind.plural] = int(index.ntotal)
            ann_info[kind.plural] = info
        meta_name = f"items-{generation:06d}.parquet"
        self._write_meta(self.dir / meta_name)
        files["items"] = meta_name
        failed = int(self.con.execute("SELECT COUNT(*) FROM items WHERE status = 'failed'").fetchone()[0])  # type: ignore[index]
        counts["failed"] = failed
        checksums = {key: sha256_file(self.dir / name) for key, name in files.items()}
        self.manifest.update(
            counts=counts,
            index_types=index_types,
            ann=ann_info,
            snapshot={"generation": generation, "files": files, "sha256": checksums, "published": time.time()},
        )
        self._write_manifest()
        self._remove_stale_snapshots(set(files.values()))
        return self.manifest

    def live_vectors(self, kind: Kind) -> LiveVectors:
        live = self.con.execute(
            "SELECT id, shard, row FROM items WHERE kind = ? AND status = 'ok'", [kind.value]
        ).fetchnumpy()
        return LiveVectors(
            np.asarray(live["id"], dtype=np.int64),
            np.asarray(live["shard"], dtype=np.int64),
            np.asarray(live["row"], dtype=np.int64),
            self._load_shard,
            self.dim,
        )

    def _load_shard(self, shard: int) -> np.ndarray:
        return np.load(self._shard_path(shard), mmap_mode="r", allow_pickle=False)

    def _write_meta(self, path: Path) -> None:
        # An image's text is its first linked caption, so image hits can show one.
        tmp = path.with_name(path.name + ".tmp")
        self.con.execute(
            f"""COPY (
                WITH first_caption AS (
                    SELECT path, arg_min(text, id) AS text FROM items
                    WHERE kind = 'text' AND status = 'ok' AND path IS NOT NULL GROUP BY path
                )
                SELECT i.id, i.kind, i.path,
                       CASE WHEN i.kind = 'image' THEN f.text ELSE i.text END AS text,
                       i.status, i.error, i.source, i.shard, i.row
                FROM items i LEFT JOIN first_caption f ON i.kind = 'image' AND f.path = i.path
                ORDER BY i.id
            ) TO '{_sql_str(tmp)}' (FORMAT parquet)"""
        )
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)

    # -- housekeeping ---------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            self._lock_file.close()

    def _load_or_create_manifest(self) -> dict[str, Any]:
        if (self.dir / MANIFEST).exists():
            manifest = read_manifest(self.dir)
            stored = ModelSpec.from_json(manifest["model"])
            if (stored.name, stored.pretrained, stored.checkpoint_sha256) != (
                self.spec.name,
                self.spec.pretrained,
                self.spec.checkpoint_sha256,
            ):
                raise IndexFormatError(
                    f"{self.dir} was built with model {stored.name} / {stored.pretrained}; "
                    f"it cannot take embeddings from {self.spec.name} / {self.spec.pretrained}. Use a new --index directory"
                )
            return manifest
        if self.spec.config is not None:
            model_dir = self.dir / MODEL_DIR
            model_dir.mkdir(exist_ok=True)
            atomic_write_bytes(model_dir / f"{self.spec.name}.json", json.dumps(self.spec.config, indent=2).encode())
        self.manifest = {
            "format_version": FORMAT_VERSION,
            "created": time.time(),
            "model": self.spec.to_json(),
            "dim": self.dim,
            "vector_dtype": "float32 while a kind is exact-search sized, float16 past it (per shard, in the .npy header)",
            "metric": "cosine",
            "counts": {"images": 0, "texts": 0, "failed": 0},
            "index_types": {},
            "snapshot": {"generation": 0, "files": {}},
        }
        self._write_manifest()
        return self.manifest

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.dir / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode())

    def _shard_path(self, shard: int) -> Path:
        return self.dir / VECTORS / f"{shard:06d}.npy"

    def _scan_next_shard(self) -> int:
        on_disk = [int(p.stem) for p in (self.dir / VECTORS).glob("*.npy") if p.stem.isdigit()]
        in_catalog = self.con.execute("SELECT COALESCE(MAX(shard), -1) FROM items").fetchone()[0]  # type: ignore[index]
        return max([int(in_catalog), *on_disk], default=-1) + 1

    def _remove_orphans(self) -> None:
        """Delete shard files no committed row uses: left by a run that died before its commit,
        or holding only vectors of items removed since."""
        used = {
            int(s) for (s,) in self.con.execute("SELECT DISTINCT shard FROM items WHERE shard IS NOT NULL").fetchall()
        }
        self.con.execute("DELETE FROM shards WHERE shard NOT IN (SELECT unnest($1::INTEGER[]))", [sorted(used)])
        for p in (self.dir / VECTORS).iterdir():
            if p.suffix == ".tmp" or (p.suffix == ".npy" and p.stem.isdigit() and int(p.stem) not in used):
                p.unlink(missing_ok=True)
        self._remove_stale_snapshots(set(snapshot_files(self.manifest).values()))

    def _remove_stale_snapshots(self, keep: set[str]) -> None:
        for p in self.dir.iterdir():
            stale = p.name.endswith(".tmp") or p.suffix in (".faiss", ".parquet")
            if p.is_file() and stale and p.name not in keep and p.name != MANIFEST:
                p.unlink(missing_ok=True)


def _records_table(records: list[Record], now: float) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([r.id for r in records], pa.int64()),
            "kind": pa.array([r.kind.value for r in records], pa.string()),
            "source": pa.array([r.source for r in records], pa.string()),
            "path": pa.array([r.path for r in records], pa.string()),
            "text": pa.array([r.text for r in records], pa.string()),
            "size": pa.array([r.size for r in records], pa.int64()),
            "mtime": pa.array([r.mtime for r in records], pa.float64()),
            "hash": pa.array([r.hash for r in records], pa.string()),
            "width": pa.array([r.width for r in records], pa.int32()),
            "height": pa.array([r.height for r in records], pa.int32()),
            "status": pa.array([r.status.value for r in records], pa.string()),
            "error": pa.array([r.error for r in records], pa.string()),
            "shard": pa.array([r.shard for r in records], pa.int32()),
            "row": pa.array([r.row for r in records], pa.int32()),
            "updated": pa.array([now] * len(records), pa.float64()),
        }
    )


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")


class _HashingWriter:
    """A write-only file that hashes what passes through, so a shard is not read back to checksum it."""

    def __init__(self, f: Any):
        self._f = f
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._f.write(data)


def _atomic_save_npy(path: Path, array: np.ndarray) -> str:
    """Write an .npy file atomically; return its sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        writer = _HashingWriter(f)
        np.save(writer, array, allow_pickle=False)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return writer.sha256.hexdigest()


class WriteLock:
    """The exclusive right to write an index directory, held until `close`."""

    def __init__(self, f: Any):
        self._f = f

    def close(self) -> None:
        self._f.close()


def acquire_lock(index_dir: Path) -> WriteLock:
    # flock is released by the kernel when the holder dies, so a killed indexer never leaves a stale lock.
    path = index_dir / LOCK
    f = path.open("a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise IndexLockedError(f"{path.parent} is being written by {holder}; wait for it to finish") from e
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return WriteLock(f)


@contextmanager
def open_writer(index_dir: Path, spec: ModelSpec, dim: int) -> Iterator[IndexWriter]:
    writer = IndexWriter(index_dir, spec, dim)
    try:
        yield writer
    finally:
        writer.close()
