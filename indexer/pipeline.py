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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipdex.indexer.config import IndexConfig, NoProgress, Progress, Summary
from clipdex.indexer.engines import Engine, EngineConfig, open_engine
from clipdex.indexer.run import IndexRun
from clipdex.indexer.sources import check_roots, no_images_error
from clipdex.retrieval.ann.build import index_writer, validate_settings
from clipdex.retrieval.config import EncoderConfig, ModelSpec
from clipdex.retrieval.errors import IndexFormatError, InputError, Interrupted
from clipdex.retrieval.imaging.captions import TextSource, open_texts
from clipdex.retrieval.model import ocr, weights
from clipdex.retrieval.model.choose import exported_encoder, onnx_or_torch
from clipdex.retrieval.model.runtime import asked_runtime, check_precision
from clipdex.retrieval.model.weights import index_encoder_config
from clipdex.retrieval.paths import canonical
from clipdex.retrieval.store.lock import acquire_lock
from clipdex.retrieval.store.manifest import MANIFEST, check_index_dir
from clipdex.retrieval.store.writer import FreshIndexDir, IndexWriter, precision_mismatch, writing

if TYPE_CHECKING:
    from clipdex.retrieval.model.encoder import Encoder

log = logging.getLogger(__name__)


def run_index(config: IndexConfig, *, progress: Progress | None = None, keep: EncoderCache | None = None) -> Summary:
    """Bring the index at `config.index_dir` up to date with the given folders and caption file. With `keep`, the
    model loaded is kept there and used again by the next run that passes it (a watcher's runs), for as long as the
    index holds the same model."""
    check_index_dir(config.index_dir)
    roots, texts = _sources(config)
    engine_config = EngineConfig(config.engine, config.ray_address, config.workers)
    fresh = FreshIndexDir(config.index_dir)
    encoder, writer = _open(config, fresh, keep)
    engine: Engine | None = None
    with writing(writer, fresh):
        try:
            with _graceful_interrupt() as stop_requested:
                engine = open_engine(engine_config, encoder)
                run = IndexRun(config, writer, encoder, engine, progress or NoProgress(), stop_requested)
                run.images(roots, texts)
                for source in texts:
                    run.texts(source)
                if config.ocr is not None:
                    writer.set_ocr(ocr.engine_name() if config.ocr else None)
                if writer.manifest.ocr is not None:
                    run.read_words(_word_reader(keep))
                run.finish(roots)
        except KeyboardInterrupt:
            run.flush()
            writer.publish()
            raise Interrupted(
                "interrupted: the work done so far is saved; run the same command again to finish"
            ) from None
        finally:
            if engine is not None:
                engine.close()
    if encoder.spec.checkpoint_sha256 and encoder.spec.pretrained:
        weights.keep_copy(Path(encoder.spec.pretrained), encoder.spec.checkpoint_sha256)
    return run.summary


def _sources(config: IndexConfig) -> tuple[list[Path], list[TextSource]]:
    """The roots (canonical) and caption files to index, checked before anything loads."""
    roots = [canonical(p) for p in config.paths]
    text_files = (config.texts,) if isinstance(config.texts, Path) else tuple(config.texts or ())
    if not roots and not text_files:
        raise InputError("nothing to index: give folders or image files, and/or --texts FILE")
    check_roots(roots)
    if config.ocr:
        ocr.engine_name()  # a missing OCR package is said before any model loads
    is_new = not (config.index_dir / MANIFEST).exists()
    if is_new:  # a root that does not exist is a typo; for an existing index it may be a folder that went away
        for root in roots:
            if not root.exists():
                raise no_images_error(root)
    texts = [
        open_texts(f, text_column=config.text_column, image_column=config.image_column, require_images=is_new)
        for f in dict.fromkeys(canonical(f) for f in text_files)  # one file named twice is read once
    ]
    return roots, texts


def _word_reader(keep: EncoderCache | None) -> ocr.WordReader:
    """The OCR models: loaded once per run, or once for all of a watcher's runs."""
    if keep is None:
        return ocr.WordReader()
    if keep.words is None:
        keep.words = ocr.WordReader()
    return keep.words


class EncoderCache:
    """The model one run loaded, for the next run over the same index (`run_index(keep=...)`), and the OCR models."""

    def __init__(self) -> None:
        self.encoder: Any = None
        self.key: tuple[Any, ...] | None = None
        self.words: ocr.WordReader | None = None

    def get(self, key: tuple[Any, ...], load: Callable[[], Any]) -> Any:
        if self.encoder is None or self.key != key:
            self.encoder, self.key = load(), key
        return self.encoder


def _open(config: IndexConfig, fresh: FreshIndexDir, keep: EncoderCache | None = None) -> tuple[Encoder, IndexWriter]:
    """The model and a writer for the index; an existing index is locked before the model loads, so a second
    indexer is refused at once."""
    encoder_config, existing = _encoder_config(config)
    precision = _precision(config, existing is not None)
    lock = acquire_lock(config.index_dir) if existing is not None else None

    def load() -> Any:
        return _exported(encoder_config, existing, config, precision) or _runtime(
            _load_encoder(encoder_config, existing), config, precision
        )

    try:
        # kept only while the index holds the very model it was loaded for (a `reindex` to another one loads anew)
        key = (existing.to_json() if existing is not None else None, encoder_config, precision, config.runtime)
        encoder = keep.get(key, load) if keep is not None and existing is not None else load()
        if config.ann is not None:
            validate_settings(config.ann, encoder.dim)
        writer = index_writer(config.index_dir, encoder.spec, encoder.dim, lock=lock, precision=precision)
    except BaseException:
        if lock is not None:
            lock.close()
        fresh.undo()
        raise
    if config.encoder is not None or not _is_cached_copy(encoder.spec):
        writer.record_model_location(encoder.spec)
    if config.ann is not None:
        writer.set_ann_settings(config.ann)
    return encoder, writer


def _precision(config: IndexConfig, existing: bool) -> str:
    """The precision to encode at: the index's own (a different one asked for is refused), else what was asked."""
    asked = check_precision(config.precision) if config.precision is not None else None
    if not existing:
        return asked or "fp32"
    from clipdex.retrieval.store.manifest import read_manifest

    held = read_manifest(config.index_dir).precision
    if asked is not None and asked != held:
        raise IndexFormatError(precision_mismatch(config.index_dir, held, asked))
    return held


def _load_encoder(encoder_config: EncoderConfig, existing: ModelSpec | None) -> Encoder:
    from clipdex.retrieval.model.encoder import load_encoder  # torch and open_clip

    return load_encoder(encoder_config, expect=existing)


def _exported(encoder_config: EncoderConfig, existing: ModelSpec | None, config: IndexConfig, precision: str) -> Any:
    """The model's export when it was made before: then this run never imports torch (the local engine only)."""
    if config.engine != "local":
        return None
    return exported_encoder(encoder_config, expect=existing, runtime=config.runtime, precision=precision)


def _runtime(encoder: Encoder, config: IndexConfig, precision: str) -> Any:
    """The encoder that runs the forward: the model's ONNX export (made now, once) on ONNX Runtime unless torch was
    asked for, the model is on a GPU, or Ray runs the encoding (its workers load torch themselves). A lower
    precision runs only on ONNX Runtime, on the CPU."""
    chosen = asked_runtime(config.runtime)
    if precision != "fp32" and (chosen == "torch" or encoder.device.type != "cpu" or config.engine != "local"):
        raise InputError(
            f"--precision {precision} runs on ONNX Runtime on the CPU with the local engine: leave out --runtime "
            "torch, --device cuda and --engine ray, or use --precision fp32"
        )
    if chosen == "torch" or encoder.device.type != "cpu" or config.engine != "local":
        return encoder
    return onnx_or_torch(encoder, required=chosen == "onnx", precision=precision)


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
    if not spec.may_be(asked):
        raise IndexFormatError(
            f"{config.index_dir} was built with {spec.name} / {spec.pretrained}, not {asked.model_name} / "
            f"{asked.pretrained}; leave out --model/--pretrained to keep using it, or index into a new directory"
        )
    return EncoderConfig(model=asked.model, pretrained=asked.pretrained, device=config.device), spec
