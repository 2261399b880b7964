"""Approximate nearest-neighbour policy: which FAISS index a kind gets, how it is trained, tuned, saved, loaded and
placed, and the builder that publishing hands to storage (`build`).

Layer: above `store/` (it reads and writes the snapshot's index files) and `model/`; below everything that searches.
`from clipdex.retrieval import ann` gives the FAISS helpers by name (`ann.plan_index`, `ann.read_index`, ...).
"""

from clipdex.retrieval.ann.choose import EXACT_MAX, IndexPlan, build_index, nlist_for, plan_index
from clipdex.retrieval.ann.devices import TorchFlatIndex, VectorIndex, flat_contents, place
from clipdex.retrieval.ann.files import read_index, write_index
from clipdex.retrieval.ann.inspect_index import describe, find_ivf, index_ids, is_exact, is_on_disk
from clipdex.retrieval.ann.ondisk import build_on_disk, quiet_stdout, release_memory
from clipdex.retrieval.ann.tune import (
    RERANK_FACTOR,
    Fetch,
    Tuning,
    apply_params,
    exact_top_k,
    parameter_ladder,
    recall_at,
    search_reranked,
    tune,
)
from clipdex.retrieval.config import parse_memory
from clipdex.retrieval.store.manifest import DEFAULT_TARGET_RECALL

__all__ = [
    "DEFAULT_TARGET_RECALL",
    "EXACT_MAX",
    "RERANK_FACTOR",
    "Fetch",
    "IndexPlan",
    "TorchFlatIndex",
    "Tuning",
    "VectorIndex",
    "apply_params",
    "build_index",
    "build_on_disk",
    "describe",
    "exact_top_k",
    "find_ivf",
    "flat_contents",
    "index_ids",
    "is_exact",
    "is_on_disk",
    "nlist_for",
    "parameter_ladder",
    "parse_memory",
    "place",
    "plan_index",
    "quiet_stdout",
    "read_index",
    "recall_at",
    "release_memory",
    "search_reranked",
    "tune",
    "write_index",
]
