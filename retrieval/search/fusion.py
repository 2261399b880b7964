"""Hybrid search: a semantic (CLIP) ranking and a lexical (full-text) one fused by reciprocal-rank fusion (Cormack,
Clarke and Büttcher, 2009): an item scores the sum over the rankings that hold it of 1 / (RRF_K + its rank there).

Ranks, not scores, are fused: a cosine and a BM25 are on scales that share nothing. An item both rankings put near
the top comes first; an item only one of them found keeps its place among that ranking's others, so a query whose
words appear nowhere ranks exactly as semantic search does. Hybrid search passes the ranking by words first, so that
on a tie (the first by words against the first by meaning) the photo that holds the words asked for comes first.
"""

from __future__ import annotations

from collections.abc import Sequence

RRF_K = 60  # the constant of the original paper, which damps the weight of the very first ranks
HYBRID_DEPTH = 100  # how deep each ranking is read for a hybrid search of k results (or k, when more)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """(id, fused score) of every id the rankings hold, best first; ties keep the order in which ids were first met
    (the earlier ranking first)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])
