"""The work of one indexing run: which image files and captions are new, changed or gone; the records for them
(vectors reused by content hash, shared between identical files, or encoded); commits every few batches and
publishes every so often, so a run killed at any moment loses at most the batches in hand."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipdex.indexer.config import IndexConfig, Progress, Summary
from clipdex.indexer.engines import Engine
from clipdex.indexer.sources import FileEntry, no_images_error, scan_root
from clipdex.retrieval.config import Kind
from clipdex.retrieval.imaging.captions import TextSource
from clipdex.retrieval.imaging.decode import PhotoMeta
from clipdex.retrieval.imaging.loader import Decoded
from clipdex.retrieval.paths import content_hash, is_at_or_under
from clipdex.retrieval.store.items import Record, Status
from clipdex.retrieval.store.writer import IndexWriter

if TYPE_CHECKING:
    from clipdex.retrieval.model.encoder import Encoder
    from clipdex.retrieval.model.ocr import WordReader

WORDS_COMMIT = 16  # images whose words are stored in one transaction


class IndexRun:
    """One indexing run's work: which files and captions changed, their records, and commits as it goes."""

    def __init__(
        self,
        config: IndexConfig,
        writer: IndexWriter,
        encoder: Encoder,
        engine: Engine,
        progress: Progress,
        stop_requested: Callable[[], bool] = lambda: False,
    ):
        self.stop_requested = stop_requested
        self.config = config
        self.writer = writer
        self.encoder = encoder
        self.engine = engine
        self.progress = progress
        self.summary = Summary()
        self.pending: list[Record] = []
        self.pending_batches = 0
        self.last_publish = time.monotonic()
        self.to_delete: list[int] = []
        self.unreadable: list[Path] = []  # folders a scan could not list
        self.missing: list[Path] = []  # roots given that do not exist now (an unplugged drive, an unmounted share)
        self.encoded_in_run: dict[str, Record] = {}  # content hash → the record that carries its vector
        self.devices: dict[str, int] = dict(writer.manifest.devices)  # root folder → its device when it held images

    # -- images ---------------------------------------------------------------------------------

    def images(self, roots: list[Path], texts: list[TextSource]) -> None:
        t0 = time.perf_counter()
        entries, scanned, sources = self._scan(roots, texts)
        existing = {r["path"]: r for r in self.writer.rows("kind = 'image'")}
        work = self._changed(entries, existing)
        self._drop_missing(entries, existing, scanned, sources)
        known = _by_hash(existing.values())
        self.summary.add_time("scan", time.perf_counter() - t0)
        if work and hasattr(self.encoder, "warm_later"):  # the image tower opens while the first photos decode
            self.encoder.warm_later(("image",))
        self.progress.start("images", len(work))
        touched: list[tuple[int, int, float]] = []
        batches = self.engine.images(
            [e.path for e in work],
            known_hashes=frozenset(known),
            max_pixels=self.config.max_pixels,
            batch_size=self.config.batch_size,
        )
        while (batch := self._next(batches)) is not None:
            encode: list[tuple[Record, Any]] = []
            for d in batch:
                entry = work[d.index]
                self._take(d, entry, existing.get(str(entry.path)), known, touched, encode)
            self._encode(encode)
            self.progress.advance(len(batch))
            self._maybe_commit()
        self.writer.touch(touched)

    def _scan(self, roots: list[Path], texts: list[TextSource]) -> tuple[dict[str, FileEntry], list[str], set[str]]:
        """Image files under the roots and those the caption files name; the roots that held any; every source."""
        entries: dict[str, FileEntry] = {}
        scanned: list[str] = []
        forgotten = self._forgotten(roots)
        for root in roots:
            found = 0
            for entry in scan_root(root, self.config.exclude, self.unreadable):
                if any(is_at_or_under(str(entry.path), f) for f in forgotten):
                    continue
                found += 1
                entries.setdefault(str(entry.path), entry)
            if found:
                scanned.append(str(root))
                self._seen_device(root)
            elif self._away(root):  # gone as a whole: unplugged, unmounted, not deleted
                self._missing_root(root)
            elif root not in self.unreadable:  # a folder that could not be listed (EIO, permission) lost nothing
                self._remove_gone_root(root)
        sources = set(scanned)
        for source in texts:
            if not source.image_column:
                continue
            sources.add(str(source.path))
            for row in source:
                if row.image is not None and row.image.is_file():  # a bad caption does not make its image bad
                    e = _scan_one(row.image, str(source.path))
                    if e is not None:
                        entries.setdefault(str(e.path), e)
        return entries, scanned, sources

    def _forgotten(self, roots: list[Path]) -> list[str]:
        """Paths `remove --forget` took out, less those this run names again (at or under them): asked for by name,
        they come back, and are forgotten no more."""
        forgotten = self.writer.manifest.forgotten
        kept = [f for f in forgotten if not any(is_at_or_under(str(root), f) for root in roots)]
        if kept != forgotten:
            self.writer.set_forgotten(kept)
        return kept

    def _changed(self, entries: dict[str, FileEntry], existing: dict[str, dict[str, Any]]) -> list[FileEntry]:
        """The files to read: new ones, and those whose size or mtime changed (or that failed before)."""
        work: list[FileEntry] = []
        for key, entry in entries.items():
            old = existing.get(key)
            if key in self.config.defer:  # still being written: its item, if any, stays as it is
                self.summary.deferred += 1
                continue
            if old and old["status"] == Status.OK.value and old["size"] == entry.size and old["mtime"] == entry.mtime:
                self.summary.unchanged += 1
            else:
                work.append(entry)
        return work

    def _drop_missing(
        self, entries: dict[str, FileEntry], existing: dict[str, dict[str, Any]], scanned: list[str], sources: set[str]
    ) -> None:
        """Items whose file is gone from a root or caption file that was read this time (not those under a folder
        that could not be listed: their files may well be there)."""
        unread = [str(f) for f in self.unreadable]
        gone = [
            r
            for p, r in existing.items()
            if p not in entries
            and (r["source"] in sources or any(is_at_or_under(p, s) for s in scanned))
            and not any(is_at_or_under(p, f) for f in unread)
        ]
        self.to_delete.extend(r["id"] for r in gone)
        self.summary.removed += len(gone)

    def _next(self, batches: Iterator[list[Decoded]]) -> list[Decoded] | None:
        t0 = time.perf_counter()
        batch = next(batches, None)
        self.summary.add_time("decode wait", time.perf_counter() - t0)
        return batch

    def _take(
        self,
        d: Decoded,
        entry: FileEntry,
        old: dict[str, Any] | None,
        known: dict[str, dict[str, Any]],
        touched: list[tuple[int, int, float]],
        encode: list[tuple[Record, Any]],
    ) -> None:
        """One decoded file: gone, failed, unchanged (only touched), or a record whose vector is reused, shared
        with an identical file of this run, already made by the engine, or still to encode (added to `encode`)."""
        rec = self._image_record(d, entry, old)
        if d.vanished:  # deleted since the scan: gone, not broken
            if old:
                self.to_delete.append(old["id"])
                self.summary.removed += 1
            return
        if d.error is not None:
            self._fail(rec, d.error)
            return
        if old and old["status"] == Status.OK.value and old["hash"] == d.hash:
            touched.append((rec.id, d.size or 0, d.mtime or 0.0))
            self.summary.unchanged += 1
            return
        self._count_new(old)
        assert d.hash is not None
        if d.hash in known:
            same = known[d.hash]
            rec.shard, rec.row, rec.width, rec.height = same["shard"], same["row"], same["width"], same["height"]
            for meta in fields(PhotoMeta):  # the same content, the same EXIF and words
                setattr(rec, meta.name, same.get(meta.name))
            rec.ocr = same.get("ocr")
        elif d.hash in self.encoded_in_run:  # an identical file earlier in this run: one vector for both
            rec.same_as = self.encoded_in_run[d.hash]
        elif d.vector is not None:  # encoded by the engine
            self.encoded_in_run[d.hash] = rec
            rec.vector = d.vector
        else:
            assert d.pixels is not None
            self.encoded_in_run[d.hash] = rec
            encode.append((rec, d.pixels))
            return
        self.pending.append(rec)

    def _image_record(self, d: Decoded, entry: FileEntry, old: dict[str, Any] | None) -> Record:
        return Record(
            id=old["id"] if old else self.writer.new_id(),
            kind=Kind.IMAGE,
            source=entry.source,
            path=str(entry.path),
            text=None,
            size=d.size,
            mtime=d.mtime,
            hash=d.hash,
            width=d.width,
            height=d.height,
            **(asdict(d.meta) if d.meta is not None else {}),
        )

    def _encode(self, encode: list[tuple[Record, Any]]) -> None:
        if not encode:
            return
        t0 = time.perf_counter()
        vectors = self.encoder.encode_pixels([p for _, p in encode])
        self.summary.add_time("encode", time.perf_counter() - t0)
        for (rec, _), vec in zip(encode, vectors, strict=True):
            rec.vector = vec
            self.pending.append(rec)

    def _indexed_from(self, root: Path) -> list[int]:
        """The items indexed at or under a root that gave no images this time; a root the index never held is a
        mistake (a typo), and an error."""
        ids = self.writer.catalog.ids_at_or_under([str(root)])
        if not ids and str(root) not in self.writer.manifest.roots:
            raise no_images_error(root, self.config.exclude)
        return ids

    def _seen_device(self, root: Path) -> None:
        with contextlib.suppress(OSError):
            if root.is_dir():
                self.devices[str(root)] = root.stat().st_dev

    def _away(self, root: Path) -> bool:
        """A root that is missing as a whole, or the empty folder its drive was mounted on."""
        return (not root.exists() and not root.is_symlink()) or self._unmounted(root)

    def _unmounted(self, root: Path) -> bool:
        """A root folder with no images now, on another device than when it last held some: the folder a drive or
        share was mounted on, with the drive unmounted (its own files were on the drive)."""
        held = self.writer.manifest.devices.get(str(root))
        try:
            return held is not None and root.is_dir() and root.stat().st_dev != held
        except OSError:
            return False

    def _missing_root(self, root: Path) -> None:
        """A root that is not there (a drive unplugged, a share unmounted): its items stay, offline, until it is back
        or they are removed."""
        self._indexed_from(root)
        self.missing.append(root)

    def offline(self, roots: list[Path]) -> None:
        """Which roots and folders are offline after this run: those that were and that this run did not read again,
        those it found missing or could not list. With --prune-missing, their items are removed instead."""
        now = [str(p) for p in [*self.missing, *self.unreadable]]
        covered = [str(r) for r in roots]
        still = [p for p in self.writer.manifest.offline if not any(is_at_or_under(p, r) for r in covered)]
        offline = sorted({*still, *now})
        offline = [p for p in offline if not any(q != p and is_at_or_under(p, q) for q in offline)]  # outermost
        if self.config.prune_missing and offline:
            ids = self.writer.catalog.ids_at_or_under(offline)
            self.to_delete.extend(ids)
            self.summary.removed += len(ids)
            self.summary.notes.append(f"removed the {len(ids)} items of {len(offline)} missing or unreadable folders")
            offline = []
        else:
            for p in offline:
                if p in now:
                    n = len(self.writer.catalog.ids_at_or_under([p]))
                    state = "is missing" if Path(p) in self.missing else "cannot be read"
                    self.summary.notes.append(
                        f"{p} {state}: its {n} items are kept, offline (hidden from searches until it is back; "
                        "`clipdex index --prune-missing` removes them)"
                    )
        self.writer.set_offline(offline)

    def _remove_gone_root(self, root: Path) -> None:
        """A folder given again that holds no images now: its items go, with a note."""
        ids = self._indexed_from(root)
        self.to_delete.extend(ids)
        self.summary.removed += len(ids)
        self.summary.notes.append(f"{root} holds no images now: removed the {len(ids)} items indexed from it")

    # -- texts ----------------------------------------------------------------------------------

    def texts(self, source: TextSource) -> None:
        src = str(source.path)
        existing_rows = self.writer.rows("kind = 'text' AND source = ?", [src])
        existing = {(r["text"], r["link"]): r for r in existing_rows if r["status"] == Status.OK.value}
        stale_failures = [r["id"] for r in existing_rows if r["status"] != Status.OK.value]
        self.to_delete.extend(stale_failures)
        known = _by_hash(self.writer.rows("kind = 'text'"))
        seen: set[tuple[str, str | None]] = set()
        queue: list[Record] = []
        missing: list[str] = []
        self.progress.start("texts", None)
        chunk = max(self.config.batch_size, self.engine.text_chunk)
        for row in source:
            link = str(row.image) if row.image is not None else None
            if row.error is not None:
                rec = Record(id=self.writer.new_id(), kind=Kind.TEXT, source=src, path=None, text=row.text or None)
                rec.link = link
                self._fail(rec, f"line {row.line}: {row.error}")
                continue
            key = (row.text, link)
            if key in seen:
                continue
            seen.add(key)
            if row.image is not None and not row.image.is_file():
                missing.append(str(row.image))
            if key in existing:
                self.summary.unchanged += 1
                continue
            self.summary.added += 1
            rec = Record(
                id=self.writer.new_id(),
                kind=Kind.TEXT,
                source=src,
                path=link,  # publishing unlinks it if that image is not indexed
                text=row.text,
                hash=content_hash(row.text.encode("utf-8")),
                link=link,
            )
            assert rec.hash is not None
            if rec.hash in known:
                rec.shard, rec.row = known[rec.hash]["shard"], known[rec.hash]["row"]
                self.pending.append(rec)
            elif rec.hash in self.encoded_in_run:
                rec.same_as = self.encoded_in_run[rec.hash]
                self.pending.append(rec)
            else:
                self.encoded_in_run[rec.hash] = rec
                queue.append(rec)
            if len(queue) >= chunk:
                self._encode_texts(queue)
                queue = []
        self._encode_texts(queue)
        gone = [r["id"] for k, r in existing.items() if k not in seen]
        self.to_delete.extend(gone)
        self.summary.removed += len(gone)
        if missing:
            self.summary.notes.append(
                f"{len(missing)} captions in {source.path.name} name an image that does not exist (e.g. {missing[0]}); "
                "they are indexed as texts without an image"
            )

    def _encode_texts(self, queue: list[Record]) -> None:
        if not queue:
            return
        t0 = time.perf_counter()
        vectors = self.engine.encode_texts([r.text or "" for r in queue], batch_size=self.config.batch_size)
        self.summary.add_time("encode", time.perf_counter() - t0)
        for rec, vec in zip(queue, vectors, strict=True):
            rec.vector = vec
        self.pending.extend(queue)
        self.progress.advance(len(queue))
        self._maybe_commit(force=True)

    # -- words in images (--ocr) -----------------------------------------------------------------

    def read_words(self, reader: WordReader) -> None:
        """Read the words in every searchable image not read yet: new and changed ones, and all of them the first
        time OCR is turned on. Stored as it goes (a run stopped part way resumes where it was)."""
        self.flush()
        leaving = set(self.to_delete)
        unread = [r for r in self.writer.catalog.unread() if r["id"] not in leaving]
        self.progress.start("words", len(unread))
        done: list[tuple[int, str]] = []
        failed: list[tuple[str, str]] = []
        t0 = time.perf_counter()
        for row in unread:
            try:
                done.append((row["id"], reader.read_file(Path(row["path"]), max_pixels=self.config.max_pixels)))
            except OSError:
                pass  # gone or unreadable now (deleted, offline): read at a later run
            except Exception as e:  # one image the OCR cannot read: stored as holding no words, the run goes on
                done.append((row["id"], ""))
                failed.append((row["path"], f"{type(e).__name__}: {e}"))
            self.progress.advance(1)
            if len(done) >= WORDS_COMMIT:
                self._store_words(done)
                done = []
                self._maybe_commit(force=True)
        self._store_words(done)
        self.summary.add_time("ocr", time.perf_counter() - t0)
        if failed:
            self.summary.notes.append(
                f"could not read the words in {len(failed)} images (e.g. {failed[0][0]}: {failed[0][1]}); they are "
                "searched by their pictures only"
            )

    def _store_words(self, done: list[tuple[int, str]]) -> None:
        if done:
            self.writer.catalog.set_ocr(done)

    # -- commits --------------------------------------------------------------------------------

    def _count_new(self, old: dict[str, Any] | None) -> None:
        if old is not None and old["status"] == Status.OK.value:
            self.summary.updated += 1
        else:
            self.summary.added += 1

    def _fail(self, rec: Record, error: str) -> None:
        rec.status, rec.error = Status.FAILED, error
        self.summary.failed += 1
        self.summary.failures.append((rec.path or rec.link or rec.text or "", error))
        self.pending.append(rec)

    def _maybe_commit(self, force: bool = False) -> None:
        if self.stop_requested():
            raise KeyboardInterrupt
        self.pending_batches += 1
        if force or self.pending_batches >= self.config.commit_every:
            self.flush()
            if time.monotonic() - self.last_publish > self.config.publish_every_s:
                t0 = time.perf_counter()
                self.writer.publish()
                self.summary.add_time("publish", time.perf_counter() - t0)
                self.last_publish = time.monotonic()

    def flush(self) -> None:
        t0 = time.perf_counter()
        if self.pending:
            self.writer.commit(self.pending)
        self.summary.add_time("write", time.perf_counter() - t0)
        self.pending = []
        self.pending_batches = 0

    def finish(self, roots: list[Path]) -> None:
        self.flush()
        t0 = time.perf_counter()
        known = self.writer.manifest.roots
        self.writer.set_roots(known + [str(r) for r in roots if str(r) not in known])
        self.writer.set_devices(self.devices)
        self.offline(roots)
        self.writer.commit([], delete_ids=self.to_delete)
        self.writer.publish()
        self.summary.add_time("publish", time.perf_counter() - t0)


def _by_hash(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stored rows by content hash, so renamed and duplicate content reuses its vector."""
    return {r["hash"]: r for r in rows if r["status"] == Status.OK.value and r["hash"] is not None}


def _scan_one(path: Path, source: str) -> FileEntry | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return FileEntry(path=path, size=st.st_size, mtime=st.st_mtime, source=source)
