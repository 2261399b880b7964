"""`IndexWriter`: one indexing run's exclusive, transactional access to an index directory.

It ties the storage pieces together (lock, manifest, catalog, vector shards, snapshot publishing); what
kind of ANN index to build is decided by the `IndexBuilder` it is given (retrieval.build.index_writer).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.retrieval.config import Kind, ModelSpec
from clipdex.retrieval.errors import IndexFormatError
from clipdex.retrieval.paths import canonical
from clipdex.retrieval.store import reader, snapshot, words
from clipdex.retrieval.store.catalog import Catalog
from clipdex.retrieval.store.items import Record
from clipdex.retrieval.store.lock import WriteLock, acquire_lock
from clipdex.retrieval.store.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    AnnSettings,
    Manifest,
    check_index_dir,
    read_manifest,
    write_manifest,
    write_model_config,
)
from clipdex.retrieval.store.shards import (
    VECTORS,
    LiveVectors,
    load_shard,
    remove_unused,
    save_shard,
    shard_numbers,
    shard_path,
)
from clipdex.retrieval.store.snapshot import IndexBuilder, PreviousIndex

log = logging.getLogger(__name__)

EXCLUSIVE_JOB = "exclusive_job"


class IndexWriter:
    """Exclusive, transactional access to an index directory for one run."""

    def __init__(
        self,
        index_dir: Path,
        spec: ModelSpec,
        dim: int,
        *,
        builder: IndexBuilder,
        float16_above: int | None = None,
        lock: WriteLock | None = None,
        job: str | None = None,
        precision: str | None = None,
    ):
        check_index_dir(index_dir)
        self.dir = index_dir
        self.spec = spec
        self.dim = dim
        self.precision = precision  # None: the index's own (fp32 for a new one)
        self.builder = builder
        self.float16_above = float16_above  # per kind: past this many live items, new shards are float16
        index_dir.mkdir(parents=True, exist_ok=True)
        (index_dir / VECTORS).mkdir(exist_ok=True)
        self.committed = False  # whether this writer has changed the catalog
        self.reuse_words = True  # False: the next publish builds the full-text index afresh (repair)
        self._lock = lock or acquire_lock(index_dir)
        try:
            self.manifest = self._load_or_create_manifest()
            self.catalog = Catalog(index_dir)
        except BaseException:
            self._lock.close()
            raise
        try:
            self._refuse_unless_job(job)
            if self.manifest.format_version < FORMAT_VERSION:
                self._upgrade()
            self._next_id = self.catalog.next_id()
            self._next_shard = max([self.catalog.max_shard(), *shard_numbers(index_dir)], default=-1) + 1
            self._remove_orphans()
        except BaseException:
            self.close()
            raise

    # -- ids and lookups ------------------------------------------------------------------------

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def rows(self, sql_where: str = "TRUE", params: list[Any] | None = None) -> list[dict[str, Any]]:
        return self.catalog.rows(sql_where, params)

    def live_vectors(self, kind: Kind) -> LiveVectors:
        return LiveVectors(*self.catalog.live(kind), self._load_shard, self.dim)

    # -- commit ---------------------------------------------------------------------------------

    def commit(
        self, records: list[Record], *, delete_ids: list[int] | None = None, state: dict[str, str] | None = None
    ) -> None:
        """Write new vectors to one shard, then upsert rows, delete ids and set job state in one transaction.

        A crash before the transaction commits leaves at most an unreferenced shard file,
        which the next writer removes.
        """
        fresh = [r for r in records if r.vector is not None]
        new_shard: tuple[int, int, str] | None = None
        if fresh:
            shard = self._next_shard
            self._next_shard += 1
            stacked = np.stack([r.vector for r in fresh])  # type: ignore[misc]
            digest = save_shard(shard_path(self.dir, shard), stacked.astype(self._vector_dtype(fresh)))
            new_shard = (shard, len(fresh), digest)
            for row, r in enumerate(fresh):
                r.shard, r.row = shard, row
        for r in records:
            if r.same_as is not None:
                assert r.same_as.shard is not None, "a shared vector is committed with or before its sharers"
                r.shard, r.row = r.same_as.shard, r.same_as.row
        self.catalog.commit(records, delete_ids=delete_ids, new_shard=new_shard, state=state)
        self.committed = True

    def touch(self, updates: list[tuple[int, int, float]]) -> None:
        self.catalog.touch(updates)

    # -- a job that must finish before anything else writes (clipdex reindex) ------------------------

    def begin_job(self, job: str, fix: str) -> None:
        """Until `end_job`, other writers are refused with `fix` (how to finish the job)."""
        self.catalog.commit([], state={EXCLUSIVE_JOB: json.dumps({"job": job, "fix": fix})})

    def end_job(self) -> None:
        self.catalog.clear_state(EXCLUSIVE_JOB)

    def _refuse_unless_job(self, job: str | None) -> None:
        pending = self.catalog.state(EXCLUSIVE_JOB)
        if pending is not None and json.loads(pending)["job"] != job:
            raise IndexFormatError(f"{self.dir}: {json.loads(pending)['fix']}")

    def relocate(self, ids: list[int], vectors: np.ndarray) -> None:
        """Give existing items new copies of their vectors (`vectors[i]` for `ids[i]`) in a fresh shard: what a
        repair re-encoded or salvaged for a damaged one."""
        if not ids:
            return
        shard = self._next_shard
        self._next_shard += 1
        digest = save_shard(shard_path(self.dir, shard), np.asarray(vectors, dtype=np.float32))
        self.catalog.relocate(ids, (shard, len(ids), digest))
        self.committed = True

    def stage_vectors(
        self, kind: Kind, ids: list[int], vectors: list[np.ndarray | None], errors: list[str | None]
    ) -> None:
        """Vectors of existing items of `kind` made with the next model (None: could not be made, with the error);
        searches keep using the current ones until `swap_staged`."""
        made = [v for v in vectors if v is not None]
        new_shard = None
        rows: list[int | None] = []
        if made:
            shard = self._next_shard
            self._next_shard += 1
            live = self.catalog.live_counts().get(kind.value, 0)
            dtype = np.float16 if self.float16_above is not None and live > self.float16_above else np.float32
            digest = save_shard(shard_path(self.dir, shard), np.stack(made).astype(dtype))
            new_shard = (shard, len(made), digest)
        row = 0
        for v in vectors:
            rows.append(row if v is not None else None)
            row += v is not None
        self.catalog.add_reencoded(ids, rows, errors, new_shard)
        self.committed = True

    def swap_staged(self, spec: ModelSpec, dim: int, state: dict[str, str]) -> int:
        """Make the staged vectors the items' vectors and `spec` the index's model (from the next publish on);
        returns how many items failed to re-encode."""
        failed = self.catalog.swap_reencoded(state)
        self.adopt_model(spec, dim)
        return failed

    def adopt_model(self, spec: ModelSpec, dim: int) -> None:
        """The model the next publish records (with a copy of its config JSON, when it has one)."""
        self.spec, self.dim = spec, dim
        if self.manifest.rerank and not self.manifest.model.same_model(spec):
            self.manifest.rerank = None  # a re-ranking head reads the model it was trained over: not this one
        if spec.config is not None:
            write_model_config(self.dir, spec)
        self.manifest.model, self.manifest.dim = spec, dim

    def record_model_location(self, spec: ModelSpec) -> None:
        """Note where the index's checkpoint is now (same content, maybe a new path, size or mtime)."""
        stored = self.manifest.model
        where = (spec.pretrained, spec.checkpoint_size, spec.checkpoint_mtime)
        if stored.same_model(spec) and where != (stored.pretrained, stored.checkpoint_size, stored.checkpoint_mtime):
            self.manifest.model = replace(spec, config=stored.config)
            write_manifest(self.dir, self.manifest)

    def set_roots(self, roots: list[str]) -> None:
        """The folders and files this index is kept up to date with (written with the next publish)."""
        self.manifest.roots = roots

    def set_forgotten(self, paths: list[str]) -> None:
        """Paths `remove --forget` took out: indexing a folder above them leaves them out (the next publish)."""
        self.manifest.forgotten = paths

    def set_devices(self, devices: dict[str, int]) -> None:
        """Each root folder's device when it last held images: an empty one on another device now was unmounted
        (the next publish)."""
        self.manifest.devices = devices

    def set_offline(self, paths: list[str]) -> None:
        """Roots and folders that could not be read: their items are kept, and offline (the next publish)."""
        self.manifest.offline = paths

    def set_ocr(self, engine: str | None) -> None:
        """The OCR engine that reads the words in new images from now on, or None to stop (the next publish)."""
        self.manifest.ocr = engine

    def set_ann_settings(self, settings: AnnSettings) -> None:
        """Index type, memory budget and target recall for this and later publishes."""
        self.manifest.ann_settings = settings

    def _vector_dtype(self, fresh: list[Record]) -> type:
        """float32 while any kind in the shard is small enough for exact search (results must equal brute
        force); float16 once every kind in it has an approximate index anyway. Exact search is per kind."""
        if self.float16_above is None:
            return np.float32
        adding = Counter(r.kind.value for r in fresh)
        live = self.catalog.live_counts()
        exact = any(int(live.get(kind, 0)) + n <= self.float16_above for kind, n in adding.items())
        return np.float32 if exact else np.float16

    # -- publish --------------------------------------------------------------------------------

    def publish(self, *, settings: AnnSettings | None = None, rebuild: bool = False) -> Manifest:
        """Build ANN indexes from the committed catalog and make them the current snapshot.

        `settings` replace the stored ANN settings; `rebuild` re-trains even where the previous index could be
        updated in place.
        """
        if settings is not None:
            self.manifest.ann_settings = settings
        self.catalog.relink_texts()
        live = {kind: self.live_vectors(kind) for kind in Kind}
        previous = {kind: None if rebuild else self._previous_index(kind) for kind in Kind}
        files, index_types, counts, ann = snapshot.write_index_files(
            self.dir, self.manifest, live, previous, self.builder, self._export_items, self._export_words
        )
        counts["failed"] = self.catalog.failed_count()
        counts["unlinked_texts"] = self.catalog.unlinked_count()
        snapshot.make_current(self.manifest, files, self.dir)
        self.manifest.counts, self.manifest.index_types, self.manifest.ann = counts, index_types, ann
        self.manifest.format_version = FORMAT_VERSION
        write_manifest(self.dir, self.manifest)
        self.committed = True  # the folder is an index now: a failure after this keeps it
        self._remove_orphans()
        return self.manifest

    def _export_items(self, path: Path) -> None:
        """The next generation's item table, carrying the manifest (less its snapshot): what `check --repair`
        rebuilds a lost manifest from."""
        kept = {**snapshot.manifest_copy(self.manifest), **snapshot.shards_copy(self.catalog.registered_shards())}
        self.catalog.export(path, metadata=kept)

    def _export_words(self, path: Path) -> None:
        """The next generation's full-text index: the current one's, with what changed since (store/words.py);
        built afresh when the current one cannot be read."""
        current = self.manifest.snapshot.files.get(words.WORDS)
        previous = self.dir / current if current and self.reuse_words else None
        words.build(path, self.catalog.documents(), previous=previous)

    def _previous_index(self, kind: Kind) -> PreviousIndex | None:
        name = self.manifest.snapshot.files.get(kind.plural)
        if not name or not (self.dir / name).is_file():
            return None
        live = reader.read_locations(self.dir, self.manifest, kind, self._load_shard)
        if live is None:
            return None
        record = self.manifest.ann.get(kind.plural)
        return PreviousIndex(self.dir / name, record, live) if record is not None else None

    def _load_shard(self, shard: int) -> np.ndarray:
        return load_shard(shard_path(self.dir, shard))

    # -- housekeeping ---------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self.catalog.close()
        finally:
            self._lock.close()

    def _load_or_create_manifest(self) -> Manifest:
        if (self.dir / MANIFEST).exists():
            manifest = read_manifest(self.dir)
            stored = manifest.model
            if not stored.same_model(self.spec):
                raise IndexFormatError(
                    f"{self.dir} was built with model {stored.name} / {stored.pretrained}; "
                    f"it cannot take embeddings from {self.spec.name} / {self.spec.pretrained}. Use a new --index directory"
                )
            if self.precision is not None and self.precision != manifest.precision:
                raise IndexFormatError(precision_mismatch(self.dir, manifest.precision, self.precision))
            return manifest
        if self.spec.config is not None:
            write_model_config(self.dir, self.spec)
        manifest = Manifest(model=self.spec, dim=self.dim, precision=self.precision or "fp32")
        write_manifest(self.dir, manifest)
        return manifest

    def _remove_orphans(self) -> None:
        """Delete files that neither the committed catalog nor the published snapshot uses: shards left by a
        run that died before its commit or holding only vectors of items removed since, and snapshots of other
        generations. A shard the published snapshot still reads stays, even if its rows are deleted and the
        deletion is not yet published."""
        published = snapshot.snapshot_shards(self.dir, self.manifest)
        if published is not None:
            used = self.catalog.used_shards() | published
            self.catalog.forget_shards(used)
            remove_unused(self.dir, used)
        snapshot.remove_stale(self.dir, set(self.manifest.snapshot.files.values()))

    def _upgrade(self) -> None:
        """Bring a format-1 catalog to format 2: canonical paths (one item per file), caption links."""
        dropped = self.catalog.canonicalize_paths(lambda p: str(canonical(p)))
        if dropped:
            log.warning(
                "%s: %d images were indexed twice under different spellings; kept one of each", self.dir, dropped
            )


@contextmanager
def writing(writer: IndexWriter, fresh: FreshIndexDir) -> Iterator[IndexWriter]:
    """Close the writer however the block ends; when it fails before committing or publishing anything, a new index
    folder is taken away again (a first run that failed leaves nothing behind)."""
    try:
        yield writer
    except BaseException:
        committed = writer.committed
        writer.close()
        if not committed:
            fresh.undo()
        raise
    writer.close()


def precision_mismatch(index_dir: Path, held: str, asked: str) -> str:
    return (
        f"{index_dir} holds {held} vectors; it cannot take {asked} ones. Leave out --precision, or index into a new "
        "directory"
    )


class FreshIndexDir:
    """Remembers whether the index folder is new, so a first run that fails leaves nothing behind."""

    def __init__(self, path: Path):
        self.path = path
        self.existed = path.exists()
        self.was_empty = self.existed and not any(path.iterdir())
        self.had_index = (path / MANIFEST).exists()

    def undo(self) -> None:
        if self.had_index or not self.path.exists():
            return
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.was_empty:  # the user made the folder: keep it, empty
            for p in self.path.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
