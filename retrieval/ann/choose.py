"""Which FAISS index a kind gets: exact search while it is fast enough; past that an inverted file whose vectors are
float32, fp16, 8-bit scalars or OPQ+PQ codes, the most precise encoding that fits the memory budget.

All indexes use inner product over L2-normalised vectors (cosine) and carry catalog ids: flat and HNSW indexes
through an IndexIDMap2, IVF indexes natively.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np

from clipdex.retrieval.ann.inspect_index import find_ivf

EXACT_MAX = 50_000  # below this a flat scan answers in a few ms on one core


_ID_BYTES = 8


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    reason: str
    bytes_estimate: int


def nlist_for(n: int) -> int:
    # FAISS's guideline is 4*sqrt(n) to 16*sqrt(n) cells, each trained on >= 39 points
    return int(max(16, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39)))


def plan_index(n: int, dim: int, *, memory: int | None = None) -> IndexPlan:
    """The factory string for n vectors of `dim` under a memory budget (bytes, None: unlimited)."""
    flat_bytes = n * (4 * dim + _ID_BYTES)
    if n <= EXACT_MAX and (memory is None or flat_bytes <= memory):
        return IndexPlan("Flat", f"{n} vectors: exact search is fast enough", flat_bytes)
    nlist = nlist_for(n)
    coarse = nlist * dim * 4
    options = [
        (f"IVF{nlist},Flat", 4 * dim, coarse),
        (f"IVF{nlist},SQfp16", 2 * dim, coarse),
        (f"IVF{nlist},SQ8", dim, coarse),
    ]
    for m in (dim // 4, dim // 8, dim // 16, dim // 32):
        if m >= 4 and dim % m == 0:
            options.append((f"OPQ{m},IVF{nlist},PQ{m}", m, coarse + dim * dim * 4))
    for factory, per_vector, overhead in options:
        need = n * (per_vector + _ID_BYTES) + overhead
        if memory is None or need <= memory:
            what = "exact vectors" if factory.endswith(",Flat") else factory.rsplit(",", 1)[1] + " codes"
            budget = "no memory limit" if memory is None else f"budget {memory / 2**20:.0f} MiB"
            return IndexPlan(factory, f"{n} vectors, {budget}: inverted file, {what}", need)
    smallest = options[-1]
    raise ValueError(
        f"{n} vectors of dim {dim} need at least {(n * (smallest[1] + _ID_BYTES) + smallest[2]) / 2**20:.0f} MiB "
        f"even as {smallest[0]}; raise --memory"
    )


def build_index(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, *, factory: str, train: np.ndarray | None = None
) -> faiss.Index:
    """Build from (vectors, ids) batches; `train` is a sample for indexes that need training."""
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index = inner if find_ivf(inner) is not None else faiss.IndexIDMap2(inner)  # IVF lists store ids natively
    if not inner.is_trained:
        if train is None or len(train) == 0:
            raise ValueError(f"{factory} needs training vectors")
        inner.train(np.ascontiguousarray(train, dtype=np.float32))
    for vectors, ids in batches:
        if len(ids):
            index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )
    return index
