"""The one place that chooses, builds, saves, loads and searches FAISS indexes.

Every index is wrapped in an IndexIDMap2 so the ids FAISS returns are catalog ids, and uses
inner product over L2-normalised vectors, i.e. cosine similarity.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

log = logging.getLogger(__name__)


class VectorIndex(Protocol):
    ntotal: int

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def choose_index_type(n: int, dim: int) -> str:
    """FAISS factory string for n vectors of `dim`. Exact search for now: see issue 5."""
    del n, dim
    return "Flat"


def build_index(vectors: np.ndarray, ids: np.ndarray, *, index_type: str | None = None) -> faiss.Index:
    n, dim = vectors.shape
    factory = index_type or choose_index_type(n, dim)
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIDMap2(inner)
    if n:
        if not inner.is_trained:
            inner.train(np.ascontiguousarray(vectors, dtype=np.float32))
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def describe(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return type(inner).__name__


def write_index(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def read_index(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))


def search(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) per query; ids are -1 past the end of a small index."""
    k = max(1, min(k, index.ntotal)) if index.ntotal else 0
    if k == 0:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
