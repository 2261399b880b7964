"""Inverted lists larger than memory: built in blocks and merged into one file by faiss.contrib.ondisk."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipdex.retrieval.ann.inspect_index import find_ivf
from clipdex.retrieval.store.atomic import TMP_SUFFIX


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
