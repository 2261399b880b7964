"""Decoding workers: batches come back in order, in parts, a batch ahead; forked from a process that holds garbage,
they never collect what they inherit."""

from __future__ import annotations

import gc
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from corpus import make_images

from clipdex.retrieval.imaging import loader
from clipdex.retrieval.imaging.decode import DecodeOptions


class _Cycle:
    """Garbage from the start that only a collection frees; it says which process freed it."""

    def __init__(self, marks: Path):
        self.marks = marks
        self.me = self

    def __del__(self) -> None:
        (self.marks / f"freed-in-{os.getpid()}").touch()


def test_decoding_workers_never_collect_what_they_inherit(tmp_path, monkeypatch):
    """A worker forked while the parent holds cyclic garbage leaves it alone, even when it collects: a destructor run
    there can wait forever on what a thread of the parent held at the fork (an ONNX Runtime session's condition
    variable did, in the test suite). The parent still frees it."""
    make_images(tmp_path / "photos", 4, seed=3)
    paths = sorted((tmp_path / "photos").iterdir())
    marks = tmp_path / "marks"
    marks.mkdir()
    real = loader.ImageFiles.__getitem__

    def collecting(self, i):
        gc.collect()  # in the worker: everything it can reach
        return real(self, i)

    monkeypatch.setattr(loader.ImageFiles, "__getitem__", collecting)
    files = loader.ImageFiles(paths, lambda image: np.asarray(image).shape, options=DecodeOptions())
    gc.disable()
    try:
        _Cycle(marks)
        batches = list(loader.iter_decoded(files, batch_size=2, workers=1))
    finally:
        gc.enable()
    decoded = [item for batch in batches for item in batch]
    assert len(decoded) == 4 and all(item.error is None and item.pixels is not None for item in decoded)
    assert not list(marks.iterdir())  # no worker freed it
    gc.collect()
    assert [m.name for m in marks.iterdir()] == [f"freed-in-{os.getpid()}"]


def test_workers_send_photos_back_in_parts_a_batch_ahead_and_batches_come_in_order(tmp_path, monkeypatch):
    """Batches of any size come back whole and in order, as decoding in this process gives them, while each worker
    is given at most `PART` photos at a time and at most a batch's worth of parts ahead of the consumer (a
    batch's pixels came back whole, four batches ahead per worker: an index run's peak memory)."""
    make_images(tmp_path / "photos", 80, seed=5)
    paths = sorted((tmp_path / "photos").iterdir())
    files = loader.ImageFiles(
        paths, lambda image: np.asarray(image, dtype=np.float32).mean(axis=(0, 1)), options=DecodeOptions()
    )
    given: list[int] = []

    class Counting(ProcessPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            given.append(len(args[0]))
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(loader, "ProcessPoolExecutor", Counting)
    here = list(loader.iter_decoded(files, batch_size=19, workers=0))
    pooled = loader.iter_decoded(files, batch_size=19, workers=2)
    first = next(pooled)
    per_batch = -(-19 // loader.PART)
    assert len(given) == 2 * per_batch + per_batch  # two batches' parts ahead, then one more per part taken
    batches = [first, *pooled]
    indices = [list(range(i, min(i + 19, 80))) for i in range(0, 80, 19)]
    assert [[d.index for d in b] for b in batches] == [[d.index for d in b] for b in here] == indices
    for got, expect in zip(batches, here, strict=True):
        for a, b in zip(got, expect, strict=True):
            assert a.error is None and np.array_equal(a.pixels, b.pixels)
    assert max(given) <= loader.PART and sum(given) == 80
