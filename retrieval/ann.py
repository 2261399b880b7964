"""The one place that chooses, builds, tunes, saves, loads and searches FAISS indexes.

Choice (`plan_index`): exact search while it is fast enough; past that an inverted file whose cells are
searched partially, with vectors kept as float32, fp16, 8-bit scalars, or OPQ+PQ codes: the most precise
encoding that fits the memory budget. Tuning (`tune`) then raises nprobe / efSearch until recall@10 against
exact search on held-out queries reaches the target, and both are stored in the manifest.

All indexes use inner product over L2-normalised vectors (cosine) and carry catalog ids: flat and HNSW indexes
through an IndexIDMap2, IVF indexes natively.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth
from faiss.contrib.inspect_tools import get_flat_data, get_invlist

from clipdex.retrieval.atomic import TMP_SUFFIX, finish_tmp
from clipdex.retrieval.snapshot import LISTS_SUFFIX

log = logging.getLogger(__name__)

EXACT_MAX = 50_000  # below this a flat scan answers in a few ms on one core
DEFAULT_TARGET_RECALL = 0.95
_ID_BYTES = 8
_MMAP_ABOVE = 256 << 20


class VectorIndex(Protocol):
    ntotal: int

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    reason: str
    bytes_estimate: int


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


def parse_memory(text: str) -> int:
    """'4G', '512M', '1.5GB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read memory size {text!r}: use e.g. 512M, 4G")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


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


def build_on_disk(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    dim: int,
    *,
    factory: str,
    train: Callable[[], np.ndarray],
    lists: Path,
    block_bytes: int,
) -> faiss.Index:
    """An inverted-file index whose lists live in the file `lists` (write the index beside it), holding at most about
    `block_bytes` of lists in memory (twice that while lists grow): vectors are added to blocks (empty copies of the
    trained index), each block is written out when full, and FAISS merges the blocks' lists into one on-disk file
    (faiss.contrib.ondisk). `train` gives the training sample, which is dropped once trained."""
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = find_ivf(index)
    if ivf is None:
        raise ValueError(f"{factory} is not an inverted-file index; on-disk lists need IVF")
    index.train(np.ascontiguousarray(train(), dtype=np.float32))
    release_memory()  # the sample and k-means' buffers are freed: give the pages back before lists grow
    per_vector = ivf.code_size + 8  # codes and an id
    blocks: list[Path] = []
    block: Any = faiss.clone_index(index)
    held = 0

    def flush(full: faiss.Index) -> None:
        path = lists.with_name(f"{lists.name}.block{len(blocks)}{TMP_SUFFIX}")
        faiss.write_index(full, str(path))
        blocks.append(path)

    try:
        for vectors, ids in batches:
            block.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64))
            held += len(ids)
            if held * per_vector >= block_bytes:
                flush(block)
                block, held = faiss.clone_index(index), 0
                release_memory()
        if held or not blocks:
            flush(block)
        del block  # its lists are in the block files now
        lists.unlink(missing_ok=True)
        with quiet_stdout():  # FAISS prints each resize of the lists file
            merge_ondisk(index, [str(b) for b in blocks], str(lists))
    finally:
        for b in blocks:
            b.unlink(missing_ok=True)
    return index


def release_memory() -> None:
    """Return freed heap pages to the system (glibc's malloc_trim), so the memory a phase of a build freed is not
    still held while the next one allocates; a no-op elsewhere."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence what C++ code prints to file descriptor 1 (FAISS's on-disk lists print as they open and grow),
    which would corrupt `--json` output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def is_on_disk(index: faiss.Index) -> bool:
    ivf = find_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def find_ivf(index: faiss.Index) -> Any:
    """The IndexIVF inside an index (under an id map or a pre-transform), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an inverted-file index
        return None


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every id the index holds (order unspecified)."""
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.vector_to_array(top.id_map)
    ivf = find_ivf(index)
    if ivf is None:
        raise TypeError(f"{type(top).__name__} does not carry catalog ids")
    parts = [get_invlist(ivf.invlists, cell)[0] for cell in range(ivf.nlist)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def describe(index: faiss.Index) -> str:
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIDMap | faiss.IndexIDMap2):
        top = faiss.downcast_index(top.index)
    if isinstance(top, faiss.IndexPreTransform):
        return f"{type(top).__name__}({type(faiss.downcast_index(top.index)).__name__})"
    return type(top).__name__


def is_exact(index: Any) -> bool:
    if isinstance(index, TorchFlatIndex):
        return True
    if faiss.get_num_gpus() > 0 and "Gpu" in type(index).__name__:
        return "Flat" in type(index).__name__ and "IVF" not in type(index).__name__
    return describe(index) in ("IndexFlat", "IndexFlatIP")


Fetch = Callable[[np.ndarray], np.ndarray]  # ids -> their stored float32 vectors
RERANK_FACTOR = 4  # an approximate index proposes 4k candidates; stored vectors pick the exact top k


_RERANK_CHUNK = 64


def search_reranked(
    index: faiss.Index, queries: np.ndarray, k: int, fetch: Fetch | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by exact score among the approximate index's top RERANK_FACTOR*k candidates (queries a chunk at a
    time, so the candidates' vectors fetched at once stay few)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
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


def write_index(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    faiss.write_index(index, str(tmp))
    finish_tmp(tmp, path)


def read_index(path: Path, *, params: str = "", mmap: bool = True) -> faiss.Index:
    """Load an index; large ones are memory-mapped (read-only) so a search starts without reading them whole. An
    on-disk index's lists are mapped from the file beside it, so a search reads only the lists it probes."""
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_MMAP if mmap and path.stat().st_size > _MMAP_ABOVE else 0)
    quiet = quiet_stdout if path.with_suffix(LISTS_SUFFIX).exists() else contextlib.nullcontext
    with quiet():
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError:
            if flags == faiss.IO_FLAG_ONDISK_SAME_DIR:
                raise
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)  # this index type cannot be mapped
    apply_params(index, params)
    return index


class TorchFlatIndex:
    """Exact inner-product search with torch on any device: the GPU path when faiss has no GPU support."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, device: str, *, chunk: int = 1 << 20):
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device)
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        self.ntotal = len(ids)
        self.d = vectors.shape[1] if vectors.ndim == 2 else 0
        self._chunk = chunk

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        q = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        best_s = torch.full((len(q), 0), float("-inf"), device=self.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.int64, device=self.device)
        for start in range(0, self.ntotal, self._chunk):  # bounded scratch memory for huge corpora
            scores = q @ self.x[start : start + self._chunk].T
            s, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            best_s, order = torch.topk(torch.cat([best_s, s], 1), min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, order)
        return best_s.cpu().numpy(), self.ids[best_i].cpu().numpy()


def flat_contents(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, ids) of an exact IDMap(Flat) index."""
    top: Any = faiss.downcast_index(index)
    return get_flat_data(faiss.downcast_index(top.index)), faiss.vector_to_array(top.id_map)


def place(index: faiss.Index, device: str) -> VectorIndex:
    """Put an index where it searches fastest: FAISS on the GPUs when this faiss build has them, exact torch
    search on CUDA when it does not (flat indexes), FAISS on the CPU otherwise."""
    if not device.startswith("cuda") or is_on_disk(index):  # on-disk lists are read where they lie
        return index
    if faiss.get_num_gpus() > 0:
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except RuntimeError as e:  # an index type without a GPU implementation
            log.info("keeping %s on the CPU: %s", describe(index), e)
            return index
    if is_exact(index):
        vectors, ids = flat_contents(index)
        return TorchFlatIndex(vectors, ids, device)
    return index
