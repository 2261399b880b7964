"""Rebuild ANN indexes from stored vectors, and import embeddings written by clip-retrieval's inference.

clip-retrieval writes, per partition i: `img_emb/img_emb_{i}.npy`, `text_emb/text_emb_{i}.npy` and
`metadata/metadata_{i}.parquet`, row j of each describing the same sample (`image_path`, `caption`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from clipdex.retrieval.ann.build import index_writer, validate_settings
from clipdex.retrieval.config import EncoderConfig, Kind
from clipdex.retrieval.errors import InputError
from clipdex.retrieval.paths import canonical
from clipdex.retrieval.store.items import Record
from clipdex.retrieval.store.manifest import AnnSettings, Manifest, check_index_dir, read_manifest
from clipdex.retrieval.store.writer import FreshIndexDir, IndexWriter, writing

log = logging.getLogger(__name__)

_CHUNK = 65536


def rebuild(index_dir: Path, settings: AnnSettings) -> Manifest:
    """Re-choose, re-train and re-tune the ANN indexes from the stored vectors; no model is loaded."""
    manifest = read_manifest(index_dir)
    validate_settings(settings, manifest.dim)
    writer = index_writer(index_dir, manifest.model, manifest.dim)
    try:
        return writer.publish(settings=settings, rebuild=True)
    finally:
        writer.close()


@dataclass(frozen=True)
class ImportSummary:
    images: int  # imported by this run (a resumed run counts what it added)
    texts: int
    partitions: int
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "texts": self.texts, "partitions": self.partitions, "resumed": self.resumed}


def _partitions(src: Path) -> list[int]:
    found = set()
    for folder, prefix in (("img_emb", "img_emb_"), ("text_emb", "text_emb_"), ("metadata", "metadata_")):
        for p in (src / folder).glob(f"{prefix}*"):
            m = re.fullmatch(rf"{prefix}(\d+)\.(npy|parquet)", p.name)
            if m:
                found.add(int(m.group(1)))
    return sorted(found)


def import_clip_retrieval(src: Path, index_dir: Path, encoder: EncoderConfig, settings: AnnSettings) -> ImportSummary:
    """Build a clipdex index from clip-retrieval output; `encoder` is the model that will encode queries."""
    if not src.is_dir():
        raise InputError(f"no such folder: {src}")
    parts = _partitions(src)
    if not parts:
        raise InputError(
            f"{src} holds no clip-retrieval output (img_emb/img_emb_N.npy, text_emb/text_emb_N.npy, metadata/metadata_N.parquet)"
        )
    check_index_dir(index_dir)
    from clipdex.retrieval.model.encoder import load_encoder  # torch: not for `clipdex build`, which needs no model

    model = load_encoder(encoder)
    validate_settings(settings, model.dim)
    fresh = FreshIndexDir(index_dir)
    writer = index_writer(index_dir, model.spec, model.dim)
    # Progress is committed with each chunk's rows, so a killed import resumes where it stopped: never twice.
    key = f"import:{canonical(src)}"
    with writing(writer, fresh):
        state = json.loads(writer.catalog.state(key) or "null")
        if (state is None and writer.catalog.next_id() > 0) or (state or {}).get("published"):
            raise InputError(f"{index_dir} already holds an index; import into a new directory")
        done = {tuple(c) for c in (state or {}).get("done", [])}
        writer.set_ann_settings(settings)
        seen = {_key(r["path"]) for r in writer.rows("kind = 'image' AND path IS NOT NULL")}
        images = texts = 0
        # rows per commit: vectors read, normalised and stored, a few copies each, within a memory budget
        chunk = (state or {}).get("chunk") or (  # a resumed import keeps its chunks, so none is read twice
            _CHUNK if settings.memory is None else int(max(1024, min(_CHUNK, settings.memory // (16 * model.dim * 4))))
        )
        for part in parts:
            for start, records in _read_partition(src, part, model.dim, writer, seen, skip=done, chunk=chunk):
                images += sum(r.kind is Kind.IMAGE for r in records)
                texts += sum(r.kind is Kind.TEXT for r in records)
                done.add((part, start))
                writer.commit(records, state={key: json.dumps({"done": sorted(done), "chunk": chunk})})
        writer.publish()
        writer.commit([], state={key: json.dumps({"done": sorted(done), "published": True})})
    return ImportSummary(images, texts, len(parts), resumed=state is not None)


def _read_partition(
    src: Path,
    part: int,
    dim: int,
    writer: IndexWriter,
    seen: set[int],
    *,
    skip: set[tuple[Any, ...]],
    chunk: int = _CHUNK,
) -> Iterator[tuple[int, list[Record]]]:
    meta_path = src / "metadata" / f"metadata_{part}.parquet"
    img_path = src / "img_emb" / f"img_emb_{part}.npy"
    txt_path = src / "text_emb" / f"text_emb_{part}.npy"
    img = _load(img_path, dim) if img_path.exists() else None
    txt = _load(txt_path, dim) if txt_path.exists() else None
    n = len(img) if img is not None else len(txt) if txt is not None else 0
    if meta_path.exists():
        meta = pq.read_table(meta_path)
        if meta.num_rows != n:
            raise InputError(f"{meta_path} has {meta.num_rows} rows but the embeddings of partition {part} have {n}")
        paths = meta["image_path"].to_pylist() if "image_path" in meta.column_names else [None] * n
        captions = meta["caption"].to_pylist() if "caption" in meta.column_names else [None] * n
    else:
        paths, captions = [None] * n, [None] * n
    if txt is not None and img is not None and len(txt) != len(img):
        raise InputError(
            f"partition {part}: {len(img)} image and {len(txt)} text embeddings; they must pair row by row"
        )
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        if (part, start) in skip:  # committed by an earlier, interrupted run of this import
            seen.update(_key(p) for p in paths[start:stop] if p is not None)
            continue
        img_chunk = _normalised(img[start:stop]) if img is not None else None
        txt_chunk = _normalised(txt[start:stop]) if txt is not None else None
        records: list[Record] = []
        for j in range(stop - start):
            path, caption = paths[start + j], captions[start + j]
            item = functools.partial(Record, source=str(src), path=path)
            if img_chunk is not None:
                key = _key(path if path is not None else f"{src}#{part}:{start + j}")
                if key not in seen:
                    seen.add(key)
                    records.append(item(id=writer.new_id(), kind=Kind.IMAGE, text=None, vector=img_chunk[j]))
            if txt_chunk is not None and caption is not None:
                records.append(item(id=writer.new_id(), kind=Kind.TEXT, text=caption, vector=txt_chunk[j], link=path))
        yield start, records


def _key(path: str) -> int:
    """An image path as 64 bits, to tell paths already imported apart in a set that stays small for billions."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _load(path: Path, dim: int) -> np.ndarray:
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if data.ndim != 2 or data.shape[1] != dim:
        raise InputError(f"{path} holds vectors of shape {data.shape}; the model gives dimension {dim}: wrong --model?")
    return data


def _normalised(x: np.ndarray) -> np.ndarray:
    """Unit rows; a row already of unit length (to float32 precision) is kept bit for bit, so an export by
    `clipdex export` imports back to the very same vectors."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.abs(norms - 1) <= 1e-6
    return np.where(unit, x, x / np.where(norms > 0, norms, 1))
