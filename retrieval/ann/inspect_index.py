"""What a FAISS index is: its type, whether it is exact, on disk or an inverted file, and the ids it holds."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist


def find_ivf(index: faiss.Index) -> Any:
    """The IndexIVF inside an index (under an id map or a pre-transform), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an inverted-file index
        return None


def is_on_disk(index: faiss.Index) -> bool:
    ivf = find_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


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
    if getattr(index, "torch_exact", False):  # devices.TorchFlatIndex
        return True
    if faiss.get_num_gpus() > 0 and "Gpu" in type(index).__name__:
        return "Flat" in type(index).__name__ and "IVF" not in type(index).__name__
    return describe(index) in ("IndexFlat", "IndexFlatIP")
