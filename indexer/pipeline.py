"""Index folders and caption files incrementally: scan → decode (workers) → encode → commit → publish.

Only new or changed files are encoded. A file whose size/mtime changed but whose content hash did
not is left alone; a renamed or duplicate file reuses the stored vector of its content.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from clipdex.indexer.decode import ImageFiles, content_hash, default_workers, iter_decoded
from clipdex.indexer.sources import FileEntry, TextSource, check_roots, open_texts, scan_roots
from clipdex.retrieval.build import AnnSettings, index_writer
from clipdex.retrieval.config import EncoderConfig, ModelSpec
from clipdex.retrieval.encoder import load_encoder
from clipdex.retrieval.errors import ClipdexError, IndexFormatError, InputError
from clipdex.retrieval.imaging import DEFAULT_MAX_PIXELS, MAX_ASPECT
from clipdex.retrieval.items import Kind, Record, Status
from clipdex.retrieval.lock import acquire_lock
from clipdex.retrieval.manifest import MANIFEST, index_encoder_config
from clipdex.retrieval.writer import IndexWriter

log = logging.getLogger(__name__)


class Interrupted(ClipdexError):
    """Ctrl-C during a run; the work committed so far is kept."""


@dataclass(frozen=True)
class IndexConfig:
    paths: tuple[Path, ...]
    index_dir: Path
    texts: Path | None = None
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


@dataclass
class Summary:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
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


class _NoProgress:
    def start(self, what: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


def run_index(config: IndexConfig, *, progress: Progress | None = None) -> Summary:
    """Bring the index at `config.index_dir` up to date with the given folders and caption file."""
    progress = progress or _NoProgress()
    roots = [p.expanduser().absolute() for p in config.paths]
    if not roots and config.texts is None:
        raise InputError("nothing to index: give folders or image files, and/or --texts FILE")
    check_roots(roots)
    texts = None
    if config.texts is not None:
        texts = open_texts(
            config.texts.expanduser().absolute(), text_column=config.text_column, image_column=config.image_column
        )
    encoder_config, existing = _encoder_config(config)
    # an existing index is locked before the model loads, so a second indexer is refused at once
    lock = acquire_lock(config.index_dir) if existing is not None else None
    try:
        encoder = load_encoder(encoder_config, expect=existing)
        writer = index_writer(config.index_dir, encoder.spec, encoder.dim, lock=lock)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    if config.ann is not None:
        writer.set_ann_settings(config.ann.to_json())
    run = _Run(config, writer, encoder, progress)
    try:
        run.images(roots, texts)
        if texts is not None:
            run.texts(texts)
        run.finish()
    except KeyboardInterrupt:
        run.flush()
        writer.publish()
        raise Interrupted("interrupted: the work done so far is saved; run the same command again to finish") from None
    finally:
        writer.close()
    return run.summary


def _encoder_config(config: IndexConfig) -> tuple[EncoderConfig, ModelSpec | None]:
    """The model to index with, and the model the index already holds (None for a new index)."""
    if not (config.index_dir / MANIFEST).exists():
        return config.encoder or EncoderConfig(device=config.device), None
    stored, spec = index_encoder_config(config.index_dir, device=config.device)
    if config.encoder is None:
        return stored, spec
    asked = config.encoder
    asked_name = Path(asked.model).stem if asked.model.endswith(".json") else asked.model
    asked_weights = (
        str(Path(asked.pretrained).expanduser().resolve())
        if asked.pretrained and Path(asked.pretrained).expanduser().is_file()
        else asked.pretrained
    )
    if (asked_name, asked_weights) != (spec.name, spec.pretrained):
        raise IndexFormatError(
            f"{config.index_dir} was built with {spec.name} / {spec.pretrained}, not {asked_name} / {asked_weights}; "
            "leave out --model/--pretrained to keep using it, or index into a new directory"
        )
    return EncoderConfig(model=asked.model, pretrained=asked.pretrained, device=config.device), spec


class _Run:
    def __init__(self, config: IndexConfig, writer: IndexWriter, encoder: Any, progress: Progress):
        self.config = config
        self.writer = writer
        self.encoder = encoder
        self.progress = progress
        self.summary = Summary()
        self.pending: list[Record] = []
        self.pending_batches = 0
        self.last_publish = time.monotonic()
        self.to_delete: list[int] = []

    # -- images ---------------------------------------------------------------------------------

    def images(self, roots: list[Path], texts: TextSource | None) -> None:
        t0 = time.perf_counter()
        entries: dict[str, FileEntry] = {}
        for entry in scan_roots(roots):
            entries.setdefault(str(entry.path), entry)
        sources = {str(r) for r in roots}
        if texts is not None and texts.image_column:
            sources.add(str(texts.path))
            for row in texts:
                if row.image is not None and row.image.is_file():  # a bad caption does not make its image bad
                    e = scan_one(row.image, str(texts.path))
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
        gone = [r for p, r in existing.items() if p not in entries and r["source"] in sources]
        self.to_delete.extend(r["id"] for r in gone)
        self.summary.removed += len(gone)

        known = _by_hash(existing.values())
        self.summary.add_time("scan", time.perf_counter() - t0)
        dataset = ImageFiles(
            [e.path for e in work],
            self.encoder.preprocess,
            known_hashes=frozenset(known),
            max_pixels=self.config.max_pixels,
            max_aspect=MAX_ASPECT if self.encoder.crops_center else None,
        )
        workers = self.config.workers if self.config.workers is not None else default_workers()
        self.progress.start("images", len(work))
        touched: list[tuple[int, int, float]] = []
        batches = iter_decoded(dataset, batch_size=self.config.batch_size, workers=min(workers, len(work)))
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
                if d.hash in known:
                    same = known[d.hash]
                    rec.shard, rec.row, rec.width, rec.height = (
                        same["shard"],
                        same["row"],
                        same["width"],
                        same["height"],
                    )
                    self.pending.append(rec)
                else:
                    assert d.pixels is not None
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

    # -- texts ----------------------------------------------------------------------------------

    def texts(self, source: TextSource) -> None:
        src = str(source.path)
        existing_rows = self.writer.rows("kind = 'text' AND source = ?", [src])
        existing = {(r["text"], r["path"]): r for r in existing_rows if r["status"] == Status.OK.value}
        stale_failures = [r["id"] for r in existing_rows if r["status"] != Status.OK.value]
        self.to_delete.extend(stale_failures)
        known = _by_hash(self.writer.rows("kind = 'text'"))
        seen: set[tuple[str, str | None]] = set()
        queue: list[Record] = []
        self.progress.start("texts", None)
        chunk = max(self.config.batch_size, 256)
        for row in source:
            image = str(row.image.absolute()) if row.image is not None else None
            if row.error is not None:
                rec = Record(id=self.writer.new_id(), kind=Kind.TEXT, source=src, path=image, text=row.text or None)
                self._fail(rec, f"line {row.line}: {row.error}")
                continue
            key = (row.text, image)
            if key in seen:
                continue
            seen.add(key)
            if key in existing:
                self.summary.unchanged += 1
                continue
            self.summary.added += 1
            rec = Record(
                id=self.writer.new_id(),
                kind=Kind.TEXT,
                source=src,
                path=image,
                text=row.text,
                hash=content_hash(row.text.encode("utf-8")),
            )
            assert rec.hash is not None
            if rec.hash in known:
                rec.shard, rec.row = known[rec.hash]["shard"], known[rec.hash]["row"]
                self.pending.append(rec)
            else:
                queue.append(rec)
            if len(queue) >= chunk:
                self._encode_texts(queue)
                queue = []
        self._encode_texts(queue)
        gone = [r["id"] for k, r in existing.items() if k not in seen]
        self.to_delete.extend(gone)
        self.summary.removed += len(gone)

    def _encode_texts(self, queue: list[Record]) -> None:
        if not queue:
            return
        t0 = time.perf_counter()
        vectors = self.encoder.encode_texts([r.text for r in queue], batch_size=self.config.batch_size)
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
        self.summary.failures.append((rec.path or rec.text or "", error))
        self.pending.append(rec)

    def _maybe_commit(self, force: bool = False) -> None:
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

    def finish(self) -> None:
        self.flush()
        t0 = time.perf_counter()
        self.writer.commit([], delete_ids=self.to_delete)
        self.writer.publish()
        self.summary.add_time("publish", time.perf_counter() - t0)


def _by_hash(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stored rows by content hash, so renamed and duplicate content reuses its vector."""
    return {r["hash"]: r for r in rows if r["status"] == Status.OK.value and r["hash"] is not None}


def scan_one(path: Path, source: str) -> FileEntry | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return FileEntry(path=path.absolute(), size=st.st_size, mtime=st.st_mtime, source=source)
