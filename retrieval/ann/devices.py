"""Where an index searches: FAISS on the CPU, FAISS on the GPUs, or exact torch search on CUDA."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_flat_data

from clipdex.retrieval.ann.inspect_index import describe, is_exact, is_on_disk

log = logging.getLogger(__name__)


class VectorIndex(Protocol):
    ntotal: int

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class TorchFlatIndex:
    """Exact inner-product search with torch on any device: the GPU path when faiss has no GPU support."""

    torch_exact = True  # what `inspect.is_exact` looks for

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
