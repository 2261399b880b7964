"""FAISS index files: written atomically, read memory-mapped when large, with on-disk lists mapped from beside them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import faiss

from clipdex.retrieval.ann.ondisk import quiet_stdout
from clipdex.retrieval.ann.tune import apply_params
from clipdex.retrieval.store.atomic import replace_with
from clipdex.retrieval.store.snapshot import LISTS_SUFFIX

_MMAP_ABOVE = 256 << 20


def write_index(index: faiss.Index, path: Path) -> None:
    replace_with(path, lambda tmp: faiss.write_index(index, str(tmp)))


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
