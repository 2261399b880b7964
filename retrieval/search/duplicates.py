"""Near-duplicate images: the connected components of the graph of image pairs whose cosine reaches a threshold.

Pairs come from a range search: over the stored vectors exactly (an exact index, or one FAISS cannot range-search
such as HNSW), or through the IVF index at its tuned nprobe for large collections (approximate: a pair the probed
lists miss is missed). Every pair found is scored again from the stored vectors, so no pair below the threshold
ever joins a group. Groups are listed largest first; within a group the largest file comes first, and each member's
score is its cosine with that first member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipdex.retrieval.config import Kind
from clipdex.retrieval.errors import InputError
from clipdex.retrieval.search.searcher import Searcher

_BATCH = 2048  # query vectors per range search


@dataclass(frozen=True)
class Duplicates:
    threshold: float
    method: str  # "exact" or "ann"
    groups: list[list[dict[str, Any]]]

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "method": self.method, "groups": self.groups}


def find_duplicates(searcher: Searcher, *, threshold: float = 0.95) -> Duplicates:
    import faiss

    from clipdex.retrieval import ann

    if not -1.0 < threshold <= 1.0:
        raise InputError(f"the threshold is a cosine in (-1, 1] (got {threshold})")
    ids = searcher.ids(Kind.IMAGE)
    index = searcher.ann_index(Kind.IMAGE)
    if len(ids) < 2 or index is None:
        return Duplicates(threshold, "exact", [])
    exact = ann.is_exact(index) or ann.find_ivf(index) is None  # FAISS range-searches IVF, not HNSW
    if exact:  # the stored vectors themselves, positions standing for ids
        flat = faiss.IndexFlatIP(searcher.manifest.dim)
        for start in range(0, len(ids), _BATCH):
            flat.add(searcher.vectors(ids[start : start + _BATCH]))
        index = flat
    parent = {int(i): int(i) for i in ids}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    radius = threshold - 1e-4  # FAISS keeps scores above the radius; exact scores below decide
    for start in range(0, len(ids), _BATCH):
        batch = ids[start : start + _BATCH]
        vectors = searcher.vectors(batch)
        lims, _, found = index.range_search(np.ascontiguousarray(vectors), radius)
        for row, query in enumerate(batch.tolist()):
            hits = found[lims[row] : lims[row + 1]]
            hits = ids[hits] if exact else hits
            hits = hits[hits > query]  # each pair once
            if not len(hits):
                continue
            scores = searcher.vectors(hits) @ vectors[row]
            for other in hits[scores >= threshold].tolist():
                a, b = root(query), root(int(other))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in parent:
        members.setdefault(root(i), []).append(i)
    groups = [_group(searcher, sorted(m)) for m in members.values() if len(m) > 1]
    groups.sort(key=lambda g: (-len(g), g[0]["path"] or ""))
    return Duplicates(threshold, "exact" if exact else "ann", groups)


def _group(searcher: Searcher, ids: list[int]) -> list[dict[str, Any]]:
    rows = searcher.rows(np.array(ids, dtype=np.int64))
    rows.sort(key=lambda r: (-(r.get("size") or 0), r["path"] or ""))
    vectors = searcher.vectors(np.array([r["id"] for r in rows], dtype=np.int64))
    scores = vectors @ vectors[0]
    return [
        {"id": r["id"], "path": r["path"], "bytes": r.get("size"), "score": float(s)}
        for r, s in zip(rows, scores, strict=True)
    ]
