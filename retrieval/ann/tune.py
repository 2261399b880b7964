"""Search deep enough: re-ranked search over stored vectors, and tuning nprobe / efSearch until recall@10 against
exact search on held-out queries reaches the target (both stored in the manifest)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from clipdex.retrieval.ann.inspect_index import describe, find_ivf, is_exact
from clipdex.retrieval.store.manifest import DEFAULT_TARGET_RECALL

log = logging.getLogger(__name__)


@dataclass
class Tuning:
    params: str = ""  # a faiss ParameterSpace string, e.g. "nprobe=16"
    recall_at_10: float | None = None
    queries: int = 0
    curve: list[tuple[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "recall_at_10": self.recall_at_10,
            "queries": self.queries,
            "curve": [[p, r] for p, r in self.curve],
        }


Fetch = Callable[[np.ndarray], np.ndarray]  # ids -> their stored float32 vectors


RERANK_FACTOR = 4  # an approximate index proposes 4k candidates; stored vectors pick the exact top k


_RERANK_CHUNK = 64


# Fewer queries than this (FAISS's own threshold for computing distances with BLAS) are searched by the calling
# thread alone: FAISS parallelises over queries, so a few gain nothing from OpenMP's team, whose spinning workers
# then compete with ONNX Runtime's for the cores. A served text query took 17 ms instead of 10 (RESULTS.md).
_FEW_QUERIES = 20


@contextlib.contextmanager
def threads_for(queries: int) -> Iterator[None]:
    """FAISS's OpenMP threads for a search of this many queries, in this thread only (libgomp keeps the setting per
    thread): one for a few, as configured otherwise."""
    if queries >= _FEW_QUERIES:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def search_reranked(
    index: faiss.Index, queries: np.ndarray, k: int, fetch: Fetch | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by exact score among the approximate index's top RERANK_FACTOR*k candidates (queries a chunk at a
    time, so the candidates' vectors fetched at once stay few)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    with threads_for(len(q)):
        return _search_reranked(index, q, k, fetch)


def _search_reranked(index: faiss.Index, q: np.ndarray, k: int, fetch: Fetch | None) -> tuple[np.ndarray, np.ndarray]:
    if fetch is None or is_exact(index):
        return index.search(q, k)
    if len(q) > _RERANK_CHUNK:
        parts = [search_reranked(index, q[s : s + _RERANK_CHUNK], k, fetch) for s in range(0, len(q), _RERANK_CHUNK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    _, cand = index.search(q, min(index.ntotal, RERANK_FACTOR * k))
    unique = np.unique(cand[cand >= 0])
    vectors = fetch(unique) if len(unique) else np.zeros((0, q.shape[1]), np.float32)
    scores_out = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids_out = np.full((len(q), k), -1, dtype=np.int64)
    for i in range(len(q)):
        row = cand[i][cand[i] >= 0]
        exact = vectors[np.searchsorted(unique, row)] @ q[i]
        order = np.argsort(-exact, kind="stable")[:k]
        scores_out[i, : len(order)] = exact[order]
        ids_out[i, : len(order)] = row[order]
    return scores_out, ids_out


def parameter_ladder(index: faiss.Index) -> list[str]:
    """Search settings from fastest to most thorough (ParameterSpace strings); empty when there is nothing to tune."""
    ivf = find_ivf(index)
    if ivf is not None:
        steps = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)
        return [f"nprobe={v}" for v in steps if v <= ivf.nlist] or ["nprobe=1"]
    if "HNSW" in describe(index):
        return [f"efSearch={v}" for v in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)]
    return []


def tune(
    index: faiss.Index,
    queries: np.ndarray,
    truth: np.ndarray,
    *,
    target: float = DEFAULT_TARGET_RECALL,
    fetch: Fetch | None = None,
) -> Tuning:
    """Smallest nprobe / efSearch whose recall@10 against `truth` (exact top-10 ids) reaches `target`,
    measured through the same re-ranked search that queries use."""
    if is_exact(index) or len(queries) == 0:
        recall = 1.0 if is_exact(index) else None
        return Tuning(params="", recall_at_10=recall, queries=len(queries))
    names = parameter_ladder(index)
    if not names:
        return Tuning(params="", recall_at_10=_recall(index, queries, truth, fetch), queries=len(queries))
    curve: list[tuple[str, float]] = []
    for name in names:
        apply_params(index, name)
        recall = _recall(index, queries, truth, fetch)
        curve.append((name, recall))
        if recall >= target:
            break
    best = next(((n, r) for n, r in curve if r >= target), curve[-1])
    apply_params(index, best[0])
    if best[1] < target:
        log.warning(
            "recall@10 %.3f is below the target %.2f even at %s: the index type is too lossy", best[1], target, best[0]
        )
    return Tuning(params=best[0], recall_at_10=best[1], queries=len(queries), curve=curve)


def recall_at(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, params: str, fetch: Fetch | None) -> float:
    apply_params(index, params)
    return _recall(index, queries, truth, fetch)


def _recall(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, fetch: Fetch | None) -> float:
    k = truth.shape[1]
    _, found = search_reranked(index, queries, k, fetch)
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def exact_top_k(queries: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Exact top-k ids for each query over streamed (vectors, ids) batches (FAISS's knn_ground_truth)."""
    ids: list[np.ndarray] = []

    def vectors() -> Iterable[np.ndarray]:
        for x, batch_ids in batches:
            ids.append(np.asarray(batch_ids, dtype=np.int64))
            yield np.ascontiguousarray(x, dtype=np.float32)

    q = np.ascontiguousarray(queries, dtype=np.float32)
    _, pos = knn_ground_truth(q, vectors(), k, metric_type=faiss.METRIC_INNER_PRODUCT)
    every = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return np.where(pos >= 0, every[np.clip(pos, 0, max(len(every) - 1, 0))] if len(every) else -1, -1)


def apply_params(index: faiss.Index, params: str) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)  # type: ignore[arg-type]
