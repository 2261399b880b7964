"""Build one kind's FAISS index for a snapshot: from scratch (choose, train, tune) or incrementally.

A trained index is reused while the plan stays the same and the corpus has not doubled or halved since
training: publishing then only removes deleted ids and adds new ones, instead of re-training on every
periodic publish of a long indexing run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

from clipdex.retrieval import ann
from clipdex.retrieval.config import Kind, ModelSpec
from clipdex.retrieval.errors import InputError
from clipdex.retrieval.store.lock import WriteLock
from clipdex.retrieval.store.manifest import AnnRecord, AnnSettings
from clipdex.retrieval.store.shards import LiveVectors
from clipdex.retrieval.store.snapshot import LISTS_SUFFIX, BuiltIndex, PreviousIndex
from clipdex.retrieval.store.writer import IndexWriter

log = logging.getLogger(__name__)

_TUNE_QUERIES = 1000
_RECHECK_QUERIES = 100  # per query set, when an updated index's recall is re-measured on publish


def validate_settings(settings: AnnSettings, dim: int) -> None:
    """Refuse an --index-type FAISS cannot build at this index's dimension, before any work is done."""
    if not settings.index_type:
        return
    try:
        faiss.index_factory(dim, settings.index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
        raise InputError(
            f"--index-type {settings.index_type!r} is not a FAISS factory string FAISS can build for dimension {dim} "
            f"({first}); see the FAISS wiki's 'The index factory'"
        ) from None


class FaissBuilder:
    """The IndexBuilder that publishing uses: FAISS indexes chosen, trained and tuned by `build_kind`."""

    def build(
        self,
        kind: Kind,
        live: LiveVectors,
        *,
        other: LiveVectors,
        previous: PreviousIndex | None,
        settings: AnnSettings | None,
        out: Path,
    ) -> BuiltIndex:
        wanted = settings or AnnSettings()
        queries = lambda: other.sample(min(1000, len(other)), np.random.default_rng(3))  # noqa: E731
        if wanted.on_disk and len(live) >= ON_DISK_MIN:
            lists = out.with_suffix(LISTS_SUFFIX)
            index, info = build_on_disk(live, wanted, out=out, lists=lists, queries=queries)
            return BuiltIndex(ann.describe(index), int(index.ntotal), info, lists=lists.name)
        index, info = build_kind(live, wanted, previous=previous, queries=queries)
        ann.write_index(index, out)
        return BuiltIndex(ann.describe(index), int(index.ntotal), info)


def index_writer(
    index_dir: Path,
    spec: ModelSpec,
    dim: int,
    *,
    lock: WriteLock | None = None,
    job: str | None = None,
    precision: str | None = None,
) -> IndexWriter:
    """A writer whose publishes build FAISS indexes, storing vectors as float16 once a kind outgrows exact search."""
    return IndexWriter(
        index_dir, spec, dim, builder=FaissBuilder(), float16_above=ann.EXACT_MAX, lock=lock, job=job,
        precision=precision,
    )  # fmt: skip


ON_DISK_MIN = 10_000  # fewer vectors than this are searched from memory even with --on-disk
ON_DISK_BUDGET = 1 << 30  # what an on-disk build holds in memory when no --memory is given


def build_on_disk(
    live: LiveVectors, settings: AnnSettings, *, out: Path, lists: Path, queries: Callable[[], np.ndarray] | None
) -> tuple[faiss.Index, AnnRecord]:
    """An IVF index with its lists on disk, built and tuned holding at most about `settings.memory` bytes for vectors:
    a fifth for the training sample (k-means takes about as much again), a sixth for lists not yet written out
    (twice that as they grow), a sixteenth for each batch of vectors read (and as much again for FAISS's scratch
    assigning it to cells). The catalog's own memory is not in it. It
    is always built afresh (its lists are never changed under a reader)."""
    n, dim = len(live), live.dim
    budget = settings.memory or ON_DISK_BUDGET
    sample_rows = budget // 5 // (4 * dim)  # the training sample the budget holds
    # as many cells as that sample can train well (39 points a cell, FAISS's minimum)
    cells = min(ann.nlist_for(n), 2 ** int(np.log2(max(sample_rows // 39, 16))))
    factory = settings.index_type or f"IVF{cells},Flat"
    probe = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = ann.find_ivf(probe)
    if ivf is None:
        raise InputError(f"--on-disk needs an inverted-file index type (IVF...), not {factory}")
    least = _min_train(probe)
    train_rows = min(_train_size(probe, n), sample_rows)
    if train_rows < least:
        raise InputError(
            f"--memory {budget / 2**20:.0f} MiB cannot hold the {least} training vectors {factory} needs "
            f"({least * dim * 4 * 4 / 2**20:.0f} MiB with the rest of the build); raise --memory or use fewer cells"
        )
    # batches of at most 4096 rows: FAISS's assignment of a batch to cells takes (rows x 1024) floats of scratch
    live.chunk = int(max(256, min(4096, budget // 16 // (4 * dim))))
    index = ann.build_on_disk(
        live.batches(),
        dim,
        factory=factory,
        train=lambda: live.sample(train_rows, np.random.default_rng(0)),
        lists=lists,
        block_bytes=budget // 6,
    )
    tuning = _tune(index, live, settings, queries)
    ann.write_index(index, out)  # names its lists file, found beside it when read (IO_FLAG_ONDISK_SAME_DIR)
    record = AnnRecord(
        factory=factory,
        reason=f"{n} vectors, inverted lists on disk ({lists.name}), built holding ~{budget / 2**20:.0f} MiB",
        bytes_estimate=int(ivf.nlist * dim * 4 + n * 8),  # in memory: the coarse centroids (and list offsets)
        trained_n=n,
        n=n,
        on_disk=True,
        **tuning.to_json(),
    )
    return index, record


def build_kind(
    live: LiveVectors,
    settings: AnnSettings,
    *,
    previous: PreviousIndex | None = None,
    queries: Callable[[], np.ndarray] | None = None,
) -> tuple[faiss.Index, AnnRecord]:
    """An index over `live`, and the manifest record of how it was chosen and tuned."""
    n = len(live)
    try:
        return _build_kind(live, settings, previous, queries)
    except (ValueError, RuntimeError) as e:  # an impossible budget, or a factory string FAISS rejects
        raise InputError(f"cannot build the index for {n} vectors: {str(e).strip().splitlines()[0][:300]}") from e


def _build_kind(
    live: LiveVectors,
    settings: AnnSettings,
    previous: PreviousIndex | None,
    queries: Callable[[], np.ndarray] | None,
) -> tuple[faiss.Index, AnnRecord]:
    n = len(live)
    if settings.index_type:
        plan = ann.IndexPlan(settings.index_type, "--index-type", 0)
    else:
        plan = ann.plan_index(n, live.dim, memory=settings.memory)
    reuse = (
        previous is not None
        and plan.factory == previous.info.factory
        and plan.factory != "Flat"
        and previous.info.trained_n // 2 <= n <= 2 * previous.info.trained_n
    )
    if reuse:
        assert previous is not None
        reused = _reuse(previous, live, settings, queries)
        if reused is not None:
            return reused
    train = None
    probe = faiss.index_factory(live.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if n == 0:
        plan = ann.IndexPlan("Flat", "no vectors yet", 0)
    elif not probe.is_trained:
        if n < _min_train(probe):
            plan = ann.IndexPlan(
                "Flat", f"{n} vectors are too few to train {plan.factory}: exact search until there are enough", 0
            )
        else:
            train = live.sample(_train_size(probe, n), np.random.default_rng(0))
    index = ann.build_index(live.batches(), live.dim, factory=plan.factory, train=train)
    tuning = ann.Tuning(recall_at_10=1.0) if ann.is_exact(index) else _tune(index, live, settings, queries)
    record = AnnRecord(
        factory=plan.factory,
        reason=plan.reason,
        bytes_estimate=plan.bytes_estimate,
        trained_n=n,
        n=n,
        **tuning.to_json(),
    )
    return index, record


def _reuse(
    previous: PreviousIndex, live: LiveVectors, settings: AnnSettings, queries: Callable[[], np.ndarray] | None
) -> tuple[faiss.Index, AnnRecord] | None:
    """The previous snapshot's trained index brought up to date, or None when it must be rebuilt: its type
    cannot remove ids (HNSW), or recall at its tuned setting fell below the target and re-tuning cannot
    restore it (the data drifted away from what the quantizer was trained on)."""
    index = ann.read_index(previous.path, mmap=False)
    info = replace(previous.info, n=len(live))
    changed = _update_in_place(index, live, previous.live)
    if changed is None:
        log.info("%s cannot remove ids: rebuilding", ann.describe(index))
        return None
    if not changed:
        return index, info
    params = info.params
    ann.apply_params(index, params)
    recall = _recall_now(index, live, queries, params)
    if recall >= settings.target_recall:
        return index, replace(info, recall_at_10=recall)
    tuning = _tune(index, live, settings, queries)
    if tuning.recall_at_10 is not None and tuning.recall_at_10 >= settings.target_recall:
        return index, replace(info, **tuning.to_json())
    log.info("recall@10 %.3f < %.2f after updates, even re-tuned: re-training", recall, settings.target_recall)
    return None


def _recall_now(index: faiss.Index, live: LiveVectors, queries: Callable[[], np.ndarray] | None, params: str) -> float:
    """Recall@10 at `params` on fresh samples of the three tuning query sets (fewer queries than tuning)."""
    sets = _query_sets(live, queries, _RECHECK_QUERIES)
    k = min(10, len(live))
    return min(ann.recall_at(index, q, ann.exact_top_k(q, live.batches(), k), params, live.fetch) for q in sets)


def _min_train(index: faiss.Index) -> int:
    """The fewest training vectors FAISS accepts: one per coarse cell, and one per centroid of a product
    quantizer's codebooks (2^nbits); an OPQ rotation trains 8-bit codebooks."""
    top = faiss.downcast_index(index)
    ivf = ann.find_ivf(index)
    least = ivf.nlist if ivf is not None else 1
    for part in (top, ivf, faiss.downcast_index(top.index) if isinstance(top, faiss.IndexPreTransform) else None):
        pq = getattr(part, "pq", None)
        if pq is not None:
            least = max(least, int(pq.ksub))
    if isinstance(top, faiss.IndexPreTransform):
        least = max(least, 256)
    return least


def _train_size(index: faiss.Index, n: int) -> int:
    ivf = ann.find_ivf(index)
    cells = ivf.nlist if ivf is not None else 256
    return int(min(n, max(40 * cells, 20_000), 200_000))  # FAISS wants at least 39 points per cell


def _tune(
    index: faiss.Index, live: LiveVectors, settings: AnnSettings, queries: Callable[[], np.ndarray] | None
) -> ann.Tuning:
    """Tune on three query sets and keep the setting that satisfies all of them: the other modality's
    vectors (what cross-modal queries look like), perturbed copies of our own (near-duplicate queries),
    and random directions (queries unrelated to the corpus, the hardest case for an inverted file)."""
    sets = _query_sets(live, queries, _TUNE_QUERIES)
    k = min(10, len(live))
    fetch = live.fetch
    tunings, truths = [], []
    for q in sets:
        truth = ann.exact_top_k(q, live.batches(), k)
        truths.append(truth)
        tunings.append(ann.tune(index, q, truth, target=settings.target_recall, fetch=fetch))
    ladder = ann.parameter_ladder(index)
    chosen = max((t.params for t in tunings), key=ladder.index) if ladder else ""  # the most thorough one needed
    recalls = [ann.recall_at(index, q, t, chosen, fetch) for q, t in zip(sets, truths, strict=True)]
    ann.apply_params(index, chosen)
    log.info("tuned %s: %s gives recall@10 >= %.3f", ann.describe(index), chosen, min(recalls))
    worst = tunings[int(np.argmin(recalls))]
    return ann.Tuning(
        params=chosen, recall_at_10=float(min(recalls)), queries=sum(len(q) for q in sets), curve=worst.curve
    )


def _query_sets(live: LiveVectors, queries: Callable[[], np.ndarray] | None, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    n_q = min(n, max(len(live), 1))
    base = live.sample(n_q, rng)
    noisy = base + rng.normal(scale=0.6 / np.sqrt(live.dim), size=base.shape).astype(np.float32)
    random = rng.normal(size=(n_q, live.dim)).astype(np.float32)
    sets = [_unit(noisy), _unit(random)]
    other = queries() if queries is not None else np.zeros((0, live.dim), np.float32)
    if len(other) >= 100:
        sets.insert(0, _unit(other[:n]))
    return sets


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _update_in_place(index: faiss.Index, live: LiveVectors, before: LiveVectors) -> bool | None:
    """Bring an index built from `before` up to `live`: drop deleted ids, replace edited ones (same id, new
    vector), add new ones. Returns whether anything changed, or None if this index type cannot remove ids."""
    edited = live.changed_since(before)
    out = np.union1d(np.setdiff1d(before.ids, live.ids), edited)
    add = np.union1d(np.setdiff1d(live.ids, before.ids), edited)
    if len(out):
        try:
            index.remove_ids(faiss.IDSelectorBatch(out))
        except RuntimeError:  # e.g. HNSW: "not implemented"
            return None
    for vectors, ids in live.batches(only=add):
        index.add_with_ids(vectors, ids)
    return bool(len(out) or len(add))
