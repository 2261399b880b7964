"""Index folders and caption files incrementally: scan → decode (workers) → encode → commit → publish.

Only new or changed files are encoded. A file whose size/mtime changed but whose content hash did
not is left alone; a renamed or duplicate file, or two identical files found in one run, share one
stored vector. Paths are canonical, so a file reached by two spellings is one item.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from clipdex.indexer.engines import Engine, EngineConfig, open_engine
from clipdex.indexer.sources import FileEntry, check_roots, no_images_error, scan_root
from clipdex.retrieval.ann.build import index_writer, validate_settings
from clipdex.retrieval.config import EncoderConfig, Kind, ModelSpec
from clipdex.retrieval.errors import IndexFormatError, InputError, Interrupted
from clipdex.retrieval.imaging.captions import TextSource, open_texts
from clipdex.retrieval.imaging.decode import DEFAULT_MAX_PIXELS, PhotoMeta
from clipdex.retrieval.model import weights
from clipdex.retrieval.model.encoder import Encoder, load_encoder
from clipdex.retrieval.model.weights import index_encoder_config
from clipdex.retrieval.paths import canonical, content_hash, is_at_or_under
from clipdex.retrieval.store.items import Record, Status
from clipdex.retrieval.store.lock import acquire_lock
from clipdex.retrieval.store.manifest import MANIFEST, AnnSettings, check_index_dir
from clipdex.retrieval.store.writer import FreshIndexDir, IndexWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    paths: tuple[Path, ...]
    index_dir: Path
    texts: Path | tuple[Path, ...] | None = None  # caption files, one or several
    text_column: str | None = None
    image_column: str | None = None
    encoder: EncoderConfig | None = None  # None: the index's own model, or the default for a new index
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    commit_every: int = 16  # batches
    publish_every_s: float = 60.0
    ann: AnnSettings | None = None  # None: keep the index's settings (automatic for a new one)
    exclude: tuple[str, ...] = ()  # globs of files and folders not to index, relative to each root
    engine: str = "local"  # where decoding and encoding run: local, or ray (`indexer.engines`)
    ray_address: str | None = None


@dataclass
class Summary:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things the user should know that are not failures
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went: scan, decode wait, encode, write

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def to_json(self) -> dict[str, int]:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "failed": self.failed,
        }


class Progress(Protocol):
    def start(self, what: str, total: int | None) -> None: ...
    def advance(self, n: int) -> None: ...


class NoProgress:
    def start(self, what: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


def run_index(config: IndexConfig, *, progress: Progress | None = None) -> Summary:
    """Bring the index at `config.index_dir` up to date with the given folders and caption file."""
    progress = progress or NoProgress()
    check_index_dir(config.index_dir)
    roots = [canonical(p) for p in config.paths]
    text_files = (config.texts,) if isinstance(config.texts, Path) else tuple(config.texts or ())
    if not roots and not text_files:
        raise InputError("nothing to index: give folders or image files, and/or --texts FILE")
    check_roots(roots)
    engine_config = EngineConfig(config.engine, config.ray_address, config.workers)
    is_new = not (config.index_dir / MANIFEST).exists()
    if is_new:  # a root that does not exist is a typo; for an existing index it may be a folder that went away
        for root in roots:
            if not root.exists():
                raise no_images_error(root)
    texts = [
        open_texts(f, text_column=config.text_column, image_column=config.image_column, require_images=is_new)
        for f in dict.fromkeys(canonical(f) for f in text_files)  # one file named twice is read once
    ]
    fresh = FreshIndexDir(config.index_dir)
    encoder_config, existing = _encoder_config(config)
    # an existing index is locked before the model loads, so a second indexer is refused at once
    lock = acquire_lock(config.index_dir) if existing is not None else None
    try:
        encoder = load_encoder(encoder_config, expect=existing)
        if config.ann is not None:
            validate_settings(config.ann, encoder.dim)
        writer = index_writer(config.index_dir, encoder.spec, encoder.dim, lock=lock)
    except BaseException:
        if lock is not None:
            lock.close()
        fresh.undo()
        raise
    if config.encoder is not None or not _is_cached_copy(encoder.spec):
        writer.record_model_location(encoder.spec)
    if config.ann is not None:
        writer.set_ann_settings(config.ann)
    engine: Engine | None = None
    try:
        with _graceful_interrupt() as stop_requested:
            engine = open_engine(engine_config, encoder)
            run = _Run(config, writer, encoder, engine, progress, stop_requested)
            run.images(roots, texts)
            for source in texts:
                run.texts(source)
            run.finish(roots)
    except KeyboardInterrupt:
        run.flush()
        writer.publish()
        writer.close()
        raise Interrupted("interrupted: the work done so far is saved; run the same command again to finish") from None
    except BaseException:
        committed = writer.committed
        writer.close()
        if not committed:
            fresh.undo()
        raise
    finally:
        if engine is not None:
            engine.close()
    writer.close()
    if encoder.spec.checkpoint_sha256 and encoder.spec.pretrained:
        weights.keep_copy(Path(encoder.spec.pretrained), encoder.spec.checkpoint_sha256)
    return run.summary


@contextlib.contextmanager
def _graceful_interrupt() -> Iterator[Callable[[], bool]]:
    """While indexing, the first Ctrl-C asks the run to stop after the batch in hand (it then saves what it
    did); a second one interrupts at once. A KeyboardInterrupt raised inside DuckDB, FAISS or torch would
    surface as their own errors, so the signal is turned into a flag the run checks between batches."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def _is_cached_copy(spec: ModelSpec) -> bool:
    return spec.pretrained is not None and Path(spec.pretrained).parent == weights.stored_copy("", "").parent


def _encoder_config(config: IndexConfig) -> tuple[EncoderConfig, ModelSpec | None]:
    """The model to index with, and the model the index already holds (None for a new index)."""
    if not (config.index_dir / MANIFEST).exists():
        return config.encoder or EncoderConfig(device=config.device), None
    if config.encoder is None:
        return index_encoder_config(config.index_dir, device=config.device)
    from clipdex.retrieval.store.manifest import read_manifest

    spec = read_manifest(config.index_dir).model
    asked = config.encoder
    asked_name = Path(asked.model).stem if asked.model.endswith(".json") else asked.model
    asked_file = Path(asked.pretrained).expanduser() if asked.pretrained else None
    same_weights = (
        spec.checkpoint_sha256 is not None and asked_file is not None and asked_file.is_file()
    ) or asked.pretrained == spec.pretrained  # a local checkpoint is compared by content when it loads
    if asked_name != spec.name or not same_weights:
        raise IndexFormatError(
            f"{config.index_dir} was built with {spec.name} / {spec.pretrained}, not {asked_name} / {asked.pretrained}; "
            "leave out --model/--pretrained to keep using it, or index into a new directory"
        )
    return EncoderConfig(model=asked.model, pretrained=asked.pretrained, device=config.device), spec


class _Run:
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
        self.encoded_in_run: dict[str, Record] = {}  # content hash → the record that carries its vector

    # -- images ---------------------------------------------------------------------------------

    def images(self, roots: list[Path], texts: list[TextSource]) -> None:
        t0 = time.perf_counter()
        entries: dict[str, FileEntry] = {}
        scanned: list[str] = []
        for root in roots:
            found = 0
            for entry in scan_root(root, self.config.exclude):
                found += 1
                entries.setdefault(str(entry.path), entry)
            if found:
                scanned.append(str(root))
            else:
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
        existing = {r["path"]: r for r in self.writer.rows("kind = 'image'")}
        work: list[FileEntry] = []
        for key, entry in entries.items():
            old = existing.get(key)
            if old and old["status"] == Status.OK.value and old["size"] == entry.size and old["mtime"] == entry.mtime:
                self.summary.unchanged += 1
            else:
                work.append(entry)
        gone = [
            r
            for p, r in existing.items()
            if p not in entries and (r["source"] in sources or any(is_at_or_under(p, s) for s in scanned))
        ]
        self.to_delete.extend(r["id"] for r in gone)
        self.summary.removed += len(gone)

        known = _by_hash(existing.values())
        self.summary.add_time("scan", time.perf_counter() - t0)
        self.progress.start("images", len(work))
        touched: list[tuple[int, int, float]] = []
        batches = self.engine.images(
            [e.path for e in work],
            known_hashes=frozenset(known),
            max_pixels=self.config.max_pixels,
            batch_size=self.config.batch_size,
        )
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            self.summary.add_time("decode wait", time.perf_counter() - t0)
            if batch is None:
                break
            encode: list[tuple[Record, torch.Tensor]] = []
            for d in batch:
                entry = work[d.index]
                old = existing.get(str(entry.path))
                rec = Record(
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
                if d.vanished:  # deleted since the scan: gone, not broken
                    if old:
                        self.to_delete.append(old["id"])
                        self.summary.removed += 1
                    continue
                if d.error is not None:
                    self._fail(rec, d.error)
                    continue
                if old and old["status"] == Status.OK.value and old["hash"] == d.hash:
                    touched.append((rec.id, d.size or 0, d.mtime or 0.0))
                    self.summary.unchanged += 1
                    continue
                self._count_new(old)
                assert d.hash is not None
                if d.hash in known:
                    same = known[d.hash]
                    rec.shard, rec.row, rec.width, rec.height = (
                        same["shard"],
                        same["row"],
                        same["width"],
                        same["height"],
                    )
                    for meta in fields(PhotoMeta):  # the same content, the same EXIF
                        setattr(rec, meta.name, same.get(meta.name))
                    self.pending.append(rec)
                elif d.hash in self.encoded_in_run:  # an identical file earlier in this run: one vector for both
                    rec.same_as = self.encoded_in_run[d.hash]
                    self.pending.append(rec)
                elif d.vector is not None:  # encoded by the engine
                    self.encoded_in_run[d.hash] = rec
                    rec.vector = d.vector
                    self.pending.append(rec)
                else:
                    assert d.pixels is not None
                    self.encoded_in_run[d.hash] = rec
                    encode.append((rec, d.pixels))
            if encode:
                pixels = torch.stack([p for _, p in encode])
                if self.encoder.device.type == "cuda":
                    pixels = pixels.pin_memory()
                t0 = time.perf_counter()
                vectors = self.encoder.encode_images(pixels)
                self.summary.add_time("encode", time.perf_counter() - t0)
                for (rec, _), vec in zip(encode, vectors, strict=True):
                    rec.vector = vec
                    self.pending.append(rec)
            self.progress.advance(len(batch))
            self._maybe_commit()
        self.writer.touch(touched)

    def _remove_gone_root(self, root: Path) -> None:
        """A folder given again that is now gone or holds no images: its items go, with a note. A root the index
        never held is a mistake (a typo), and an error."""
        ids = self.writer.catalog.ids_at_or_under([str(root)])
        if not ids and str(root) not in self.writer.manifest.roots:
            raise no_images_error(root)
        self.to_delete.extend(ids)
        self.summary.removed += len(ids)
        state = "is gone" if not root.exists() else "holds no images now"
        self.summary.notes.append(f"{root} {state}: removed the {len(ids)} items indexed from it")

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
