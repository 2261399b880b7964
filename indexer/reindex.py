"""`clipdex reindex`: re-encode an index's items with another model, in place and crash-safe.

The new vectors are staged beside the current ones (catalog table `reencoded`, new shards) while searches keep
answering from the published snapshot; when every item has its new vector, one transaction swaps them in and the
next publish records the new model. A killed run resumes where it stopped; until it finishes, other writers are
refused with the command that finishes it. No folder is walked: the items are the catalog's. When the new model's
image tower is identical to the index's (a `lit` fine-tune), image vectors are kept and only texts re-encoded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipdex.indexer.pipeline import NoProgress, Progress
from clipdex.retrieval.ann.build import index_writer
from clipdex.retrieval.config import EncoderConfig, Kind
from clipdex.retrieval.errors import InputError, ModelError
from clipdex.retrieval.imaging.decode import DEFAULT_MAX_PIXELS
from clipdex.retrieval.imaging.loader import ImageFiles, default_workers, iter_decoded
from clipdex.retrieval.model.encoder import Encoder, load_encoder
from clipdex.retrieval.model.weights import index_encoder_config
from clipdex.retrieval.store.lock import acquire_lock
from clipdex.retrieval.store.manifest import read_manifest
from clipdex.retrieval.store.writer import IndexWriter

log = logging.getLogger(__name__)

JOB = "reindex"
_STATE = "reindex"


@dataclass
class ReindexSummary:
    model: str
    pretrained: str | None
    images: int = 0  # re-encoded by this run
    texts: int = 0
    images_kept: bool = False  # the image tower is unchanged: image vectors were kept as they are
    failed: int = 0  # items that could not be re-encoded (their files are gone or unreadable)
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pretrained": self.pretrained,
            "images": self.images,
            "texts": self.texts,
            "images_kept": self.images_kept,
            "failed": self.failed,
            "resumed": self.resumed,
        }


def reindex(
    index_dir: Path,
    encoder: EncoderConfig,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    progress: Progress | None = None,
) -> ReindexSummary:
    progress = progress or NoProgress()
    manifest = read_manifest(index_dir)
    lock = acquire_lock(index_dir, holder="clipdex reindex")
    try:
        new = load_encoder(encoder)
        writer = index_writer(index_dir, manifest.model, manifest.dim, lock=lock, job=JOB)
    except BaseException:
        lock.close()
        raise
    try:
        return _reindex(writer, new, batch_size, default_workers() if workers is None else workers, progress)
    finally:
        writer.close()


def _reindex(writer: IndexWriter, new: Encoder, batch_size: int, workers: int, progress: Progress) -> ReindexSummary:
    summary = ReindexSummary(new.spec.name, new.spec.pretrained)
    target = {"model": new.spec.to_json(), "dim": new.dim}
    pending = writer.catalog.state(_STATE)
    if pending is not None:
        started = json.loads(pending)
        if not new.spec.same_model(type(new.spec).from_json(started["model"])):
            raise InputError(
                f"an unfinished reindex to {started['model']['name']} / {started['model']['pretrained']} holds "
                f"{writer.dir}: finish it first with `clipdex reindex --index {writer.dir} --pretrained "
                f"{started['model']['pretrained']}`"
            )
        summary.resumed, summary.images_kept = True, bool(started.get("images_kept"))
        if started.get("phase") == "swapped":  # killed between the swap and the publish
            writer.adopt_model(new.spec, new.dim)
            return _publish(writer, summary)
    else:
        if writer.manifest.model.same_model(new.spec):
            raise InputError(f"{writer.dir} already uses {new.spec.name} / {new.spec.pretrained}: nothing to re-encode")
        summary.images_kept = new.dim == writer.dim and _same_image_tower(writer.dir, new)
        writer.begin_job(
            JOB,
            f"an unfinished `clipdex reindex` holds this index; finish it: `clipdex reindex --index {writer.dir} "
            f"--pretrained {new.spec.pretrained}`",
        )
        writer.catalog.commit([], state={_STATE: json.dumps({**target, "images_kept": summary.images_kept})})
    summary.texts = _texts(writer, new, batch_size, progress)
    if summary.images_kept:
        writer.catalog.reencode_as_is(Kind.IMAGE)
    else:
        summary.images = _images(writer, new, batch_size, workers, progress)
    summary.failed = writer.swap_staged(
        new.spec, new.dim, {_STATE: json.dumps({**target, "images_kept": summary.images_kept, "phase": "swapped"})}
    )
    return _publish(writer, summary)


def _publish(writer: IndexWriter, summary: ReindexSummary) -> ReindexSummary:
    writer.publish(rebuild=True)
    writer.catalog.clear_state(_STATE)
    writer.end_job()
    return summary


def _texts(writer: IndexWriter, new: Encoder, batch_size: int, progress: Progress) -> int:
    rows = writer.catalog.not_reencoded(Kind.TEXT)
    progress.start("texts", len(rows))
    chunk = max(batch_size, 256)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        vectors = new.encode_texts([r["text"] or "" for r in part], batch_size=batch_size)
        writer.stage_vectors(Kind.TEXT, [r["id"] for r in part], list(vectors), [None] * len(part))
        progress.advance(len(part))
    return len(rows)


def _images(writer: IndexWriter, new: Encoder, batch_size: int, workers: int, progress: Progress) -> int:
    rows = writer.catalog.not_reencoded(Kind.IMAGE)
    progress.start("images", len(rows))
    files = ImageFiles([Path(r["path"]) for r in rows], new.preprocess, options=new.decode_options(DEFAULT_MAX_PIXELS))
    for batch in iter_decoded(files, batch_size=batch_size, workers=min(workers, len(rows))):
        good = [d for d in batch if d.pixels is not None]
        encoded = iter(new.encode_images(torch.stack([d.pixels for d in good])) if good else [])  # type: ignore[misc]
        vectors = [next(encoded) if d.pixels is not None else None for d in batch]
        errors = [None if d.pixels is not None else f"could not be re-encoded: {d.error}" for d in batch]
        writer.stage_vectors(Kind.IMAGE, [rows[d.index]["id"] for d in batch], vectors, errors)
        progress.advance(len(batch))
    return len(rows)


def _same_image_tower(index_dir: Path, new: Encoder) -> bool:
    """Whether the new model's image tower is bit for bit the index's (then image vectors stay valid)."""
    try:
        config, spec = index_encoder_config(index_dir, device="cpu")
        old = load_encoder(config, expect=spec)
    except ModelError as e:
        log.warning("cannot load the index's current model to compare image towers (%s): re-encoding images", e)
        return False
    mine = old.model.visual.state_dict()  # type: ignore[union-attr, operator]
    theirs = new.model.visual.state_dict()  # type: ignore[union-attr, operator]
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine)
