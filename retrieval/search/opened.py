"""A published snapshot opened for searching: its FAISS indexes placed where they search fastest, its item table,
and vector search with the approximate candidates re-ranked exactly on the stored vectors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.retrieval.config import Kind
from clipdex.retrieval.model.choose import device_name
from clipdex.retrieval.search.hits import Hit, hits_from_rows
from clipdex.retrieval.store.manifest import Manifest
from clipdex.retrieval.store.reader import PublishedItems, ids_under, read_file, verify
from clipdex.retrieval.store.words import WORDS, WordIndex


@dataclass
class OpenSnapshot:
    """One published generation, opened: FAISS indexes per target and the item table (an arrow table, looked up
    per hit: no Python object per item)."""

    manifest: Manifest
    stamp: tuple[int, int, int]
    indexes: dict[Kind, Any]
    items: PublishedItems
    rows: Any = None  # every column of the item table, read when a filter first needs it
    filtered: dict[Any, np.ndarray] = field(default_factory=dict)  # recent filters' matching ids
    offline: frozenset[int] | None = None  # ids of items under the manifest's offline folders, once asked
    words: WordIndex | None = None  # the full-text index (None in a snapshot published before there was one)


def offline_ids(snap: OpenSnapshot) -> frozenset[int]:
    """Items whose file is at or under a root or folder that could not be read at the last run (kept, offline)."""
    if snap.offline is None:
        snap.offline = ids_under(snap.items, snap.manifest.offline)
    return snap.offline


def open_snapshot(index_dir: Path, manifest: Manifest, stamp: tuple[int, int, int], device: str) -> OpenSnapshot:
    from clipdex.retrieval import ann

    files = manifest.snapshot.files
    verify(index_dir, files, manifest.snapshot.sha256)
    indexes: dict[Kind, Any] = {}
    for target in Kind:
        name = files.get(target.plural)
        if name:
            record = manifest.ann.get(target.plural)
            params = record.params if record is not None else ""
            index = read_file(index_dir / name, lambda p, params=params: ann.read_index(p, params=params))
            indexes[target] = ann.place(index, device_name(device))
    items = PublishedItems.open(index_dir, manifest)
    name = files.get(WORDS)  # opened now: the file is read through this descriptor after a publish deletes it
    found = read_file(index_dir / name, WordIndex) if name else None
    return OpenSnapshot(manifest, stamp, indexes, items, words=found)


def search(snap: OpenSnapshot, queries: np.ndarray, k: int, target: Kind) -> list[list[Hit]]:
    from clipdex.retrieval import ann

    index = snap.indexes.get(target)
    if index is None or index.ntotal == 0:
        return [[] for _ in range(len(queries))]
    k = min(k, int(index.ntotal))
    scores, ids = ann.search_reranked(index, queries, k, snap.items.vectors)
    return [hits(snap, s, i) for s, i in zip(scores, ids, strict=True)]


def hits(snap: OpenSnapshot, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
    keep = ids >= 0
    scores, ids = scores[keep], ids[keep]
    return hits_from_rows(scores, ids, snap.items.rows(ids))
