"""Vectors a repair finds damaged or missing, made again from what still holds them.

In order: a text is encoded again from its own words (the catalog keeps them); an image from its file, when the
file is there with the content that was indexed (its hash); else from the published FAISS index when that holds
vectors exactly (a flat index); only an item none of these holds is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.retrieval.config import Kind
from clipdex.retrieval.imaging.decode import DEFAULT_MAX_PIXELS
from clipdex.retrieval.imaging.loader import ImageFiles, default_workers, iter_decoded
from clipdex.retrieval.maintain.salvage import vectors_from
from clipdex.retrieval.store.writer import IndexWriter

log = logging.getLogger(__name__)

_BATCH = 32


@dataclass
class Recovered:
    reencoded: dict[str, int] = field(default_factory=lambda: {"images": 0, "texts": 0})
    salvaged: int = 0  # read back from the published FAISS index
    lost: list[tuple[int, str, str]] = field(default_factory=list)  # (id, what it was, why nothing holds it)


def recover_vectors(
    writer: IndexWriter, rows: list[dict[str, Any]], exact: dict[Kind, Any], open_encoder: Callable[[Path], Any]
) -> Recovered:
    """Give each of `rows` (catalog rows whose vector cannot be read) its vector again, or delete it as lost."""
    out = Recovered()
    if not rows:
        return out
    encoder = open_encoder(writer.dir)
    texts = [r for r in rows if r["kind"] == Kind.TEXT.value]
    for start in range(0, len(texts), 256):
        part = texts[start : start + 256]
        writer.relocate([r["id"] for r in part], encoder.encode_texts([r["text"] or "" for r in part]))
        out.reencoded["texts"] += len(part)
    images = [r for r in rows if r["kind"] == Kind.IMAGE.value]
    unread = _images_from_files(writer, images, encoder, out)
    from_index = vectors_from(exact[Kind.IMAGE], [r["id"] for r in unread]) if exact.get(Kind.IMAGE) else {}
    if from_index:
        writer.relocate(list(from_index), np.stack(list(from_index.values())))
        out.salvaged = len(from_index)
    for r, why in ((r, r["_why"]) for r in unread if r["id"] not in from_index):
        out.lost.append((int(r["id"]), str(r["path"]), why))
    if out.lost:
        writer.catalog.commit([], delete_ids=[i for i, _, _ in out.lost])
    return out


def _images_from_files(
    writer: IndexWriter, rows: list[dict[str, Any]], encoder: Any, out: Recovered
) -> list[dict[str, Any]]:
    """Encode the images whose files still hold what was indexed; return the rows that could not be, each with
    `_why`."""
    present = []
    unread = []
    for r in rows:
        if r["path"] and Path(r["path"]).is_file():
            present.append(r)
        else:
            unread.append({**r, "_why": "its file is gone"})
    if not present:
        return unread
    files = ImageFiles(
        [Path(r["path"]) for r in present], encoder.preprocess, options=encoder.decode_options(DEFAULT_MAX_PIXELS)
    )
    workers = min(default_workers(), max(1, len(present) // _BATCH))
    for batch in iter_decoded(files, batch_size=_BATCH, workers=workers if len(present) > _BATCH else 0):
        good = []
        for d in batch:
            row = present[d.index]
            if d.pixels is None:
                unread.append({**row, "_why": f"its file cannot be decoded now ({d.error})"})
            elif row["hash"] and d.hash != row["hash"]:
                unread.append({**row, "_why": "its file has changed since it was indexed"})
            else:
                good.append(d)
        if good:
            vectors = encoder.encode_pixels([d.pixels for d in good])
            writer.relocate([present[d.index]["id"] for d in good], vectors)
            out.reencoded["images"] += len(good)
    return unread
