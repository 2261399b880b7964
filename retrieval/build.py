"""Build one kind's FAISS index for a snapshot: from scratch (choose, train, tune) or incrementally.

A trained index is reused while the plan stays the same and the corpus has not doubled or halved since
training: publishing then only removes deleted ids and adds new ones, instead of re-training on every
periodic publish of a long indexing run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from retrieval import ann

log = logging.getLogger(__name__)

_TUNE_QUERIES = 1000
_CHUNK = 65536


@dataclass(frozen=True)
class AnnSettings:
    """What the user asked for; stored in the manifest so later publishes keep it."""

    index_type: str | None = None  # a FAISS factory string; None: automatic
    memory: int | None = None  # bytes the index may take; None: no limit
    target_recall: float = ann.DEFAULT_TARGET_RECALL

    def to_json(self) -> dict[str, Any]:
        return {"index_type": self.index_type, "memory": self.memory, "target_recall": self.target_recall}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> AnnSettings:
        data = data or {}
        return cls(data.get("index_type"), data.get("memory"), data.get("target_recall", ann.DEFAULT_TARGET_RECALL))


class LiveVectors:
    """The searchable vectors of one kind, read from shards on demand: never all in memory at once."""

    def __init__(
        self, ids: np.ndarray, shards: np.ndarray, rows: np.ndarray, load: Callable[[int], np.ndarray], dim: int
    ):
        order = np.argsort(ids, kind="stable")
        self.ids, self.shards, self.rows = ids[order], shards[order], rows[order]
        self._load = load
        self.dim = dim

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, only: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(float32 vectors, ids) shard by shard, optionally restricted to the ids in `only`."""
        keep = np.ones(len(self.ids), dtype=bool) if only is None else np.isin(self.ids, only)
        for shard in np.unique(self.shards[keep]).tolist():
            sel = keep & (self.shards == shard)
            data = self._load(int(shard))
            rows, ids = self.rows[sel], self.ids[sel]
            for start in range(0, len(rows), _CHUNK):
                yield np.asarray(data[rows[start : start + _CHUNK]], dtype=np.float32), ids[start : start + _CHUNK]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if n >= len(self.ids):
            return (
                np.concatenate([v for v, _ in self.batches()]) if len(self.ids) else np.zeros((0, self.dim), np.float32)
            )
        pick = np.sort(rng.choice(len(self.ids), size=n, replace=False))
        out = np.empty((n, self.dim), dtype=np.float32)
        for shard in np.unique(self.shards[pick]).tolist():
            mask = self.shards[pick] == shard
            out[mask] = self._load(int(shard))[self.rows[pick][mask]]
        return out


def build_kind(
    live: LiveVectors,
    settings: AnnSettings,
    *,
    previous: faiss.Index | None = None,
    previous_info: dict[str, Any] | None = None,
    queries: Callable[[], np.ndarray] | None = None,
) -> tuple[faiss.Index, dict[str, Any]]:
    """An index over `live`, and the manifest record of how it was chosen and tuned."""
    n = len(live)
    if settings.index_type:
        plan = ann.IndexPlan(settings.index_type, "--index-type", 0)
    else:
        plan = ann.plan_index(n, live.dim, memory=settings.memory)
    info = dict(previous_info or {})
    reuse = (
        previous is not None
        and plan.factory == info.get("factory")
        and plan.factory != "Flat"
        and info.get("trained_n", 0) // 2 <= n <= 2 * info.get("trained_n", 0)
    )
    if reuse:
        assert previous is not None
        _update_in_place(previous, live)
        return previous, {**info, "n": n}
    train = None
    probe = faiss.index_factory(live.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not probe.is_trained:
        if n == 0:
            plan = ann.IndexPlan("Flat", "empty", 0)
        else:
            train = live.sample(_train_size(probe, n), np.random.default_rng(0))
    index = ann.build_index(live.batches(), live.dim, factory=plan.factory, train=train)
    tuning = ann.Tuning(recall_at_10=1.0) if ann.is_exact(index) else _tune(index, live, settings, queries)
    record = {
        "factory": plan.factory,
        "reason": plan.reason,
        "bytes_estimate": plan.bytes_estimate,
        "trained_n": n,
        "n": n,
        **tuning.to_json(),
    }
    return index, record


def _train_size(index: faiss.Index, n: int) -> int:
    ivf = ann._ivf(index)
    cells = ivf.nlist if ivf is not None else 256
    return int(min(n, max(64 * cells, 20_000), 250_000))


def _tune(
    index: faiss.Index, live: LiveVectors, settings: AnnSettings, queries: Callable[[], np.ndarray] | None
) -> ann.Tuning:
    q = queries() if queries is not None else np.zeros((0, live.dim), np.float32)
    if len(q) < 100:  # no other modality to query with: perturbed copies of our own vectors
        base = live.sample(min(_TUNE_QUERIES, len(live)), np.random.default_rng(1))
        noisy = base + np.random.default_rng(2).normal(scale=0.6 / np.sqrt(live.dim), size=base.shape).astype(
            np.float32
        )
        q = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    truth = ann.exact_top_k(q, live.batches(), min(10, len(live)))
    tuning = ann.tune(index, q, truth, target=settings.target_recall)
    log.info("tuned %s: %s gives recall@10 %.3f", ann.describe(index), tuning.params, tuning.recall_at_10 or 0)
    return tuning


def _update_in_place(index: faiss.Index, live: LiveVectors) -> None:
    held = ann.index_ids(index)
    gone = np.setdiff1d(held, live.ids)
    if len(gone):
        index.remove_ids(faiss.IDSelectorBatch(gone))
    new = np.setdiff1d(live.ids, held)
    if len(new):
        for vectors, ids in live.batches(only=new):
            index.add_with_ids(vectors, ids)
