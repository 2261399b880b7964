"""Where relevance ends for one query: `search --relevant` returns every item judged relevant, not a fixed k.

One fixed score threshold fails: a cosine of 0.91 can be relevant for one query while 0.93 is already noise for
another, since each query (and each wording of it) has its scores at its own level. The cut-off here is calibrated
against the query's own scores over the library: their median says where this query's noise lies (most of a library
is not relevant to any one query), the mean of its best three scores where its best matches lie, and an item is
judged relevant when its score is at least `fraction` of the way from the first to the second. The fraction was
chosen on labelled data, held out from the queries it was scored on (benchmarks/bench_relevant.py, figures in
benchmarks/RESULTS.md), where it beat every fixed threshold chosen the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RELEVANT_FRACTION = 0.7  # of the way from the query's median score to its best (measured: benchmarks/RESULTS.md)
RELEVANT_MAX = 1000  # the most results --relevant returns
SAMPLE = 50_000  # scores the median is read from; a larger library is sampled (seeded, so a query's cut-off is stable)
TOP = 3  # the best scores averaged: one odd item does not set the bar alone


@dataclass(frozen=True)
class Cutoff:
    threshold: float  # a result is relevant when its cosine reaches this
    centre: float  # the median of the query's scores over the library (or a sample of it)
    best: float  # the mean of its TOP best scores

    def to_json(self) -> dict[str, float]:
        return {"threshold": self.threshold, "median": self.centre, "best": self.best}


def cutoff(scores: np.ndarray, best: np.ndarray, fraction: float = RELEVANT_FRACTION) -> Cutoff:
    """The cut-off from a query's `scores` over the library (all, or a sample) and its `best` scores (the top of the
    whole library; the first TOP are used)."""
    scores = np.asarray(scores, dtype=np.float64)
    top = np.sort(np.asarray(best, dtype=np.float64))[::-1][:TOP]
    if not len(scores) or not len(top):
        return Cutoff(float("inf"), 0.0, 0.0)
    centre, high = float(np.median(scores)), float(top.mean())
    return Cutoff(centre + fraction * max(high - centre, 0.0), centre, high)


def sample_ids(ids: np.ndarray, size: int = SAMPLE) -> np.ndarray:
    """All of `ids` when they are few, else a seeded sample of `size` of them (ascending)."""
    if len(ids) <= size:
        return ids
    return np.sort(np.random.default_rng(0).choice(ids, size, replace=False))
