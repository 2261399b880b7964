"""Decoding workers forked from a process that holds garbage: they never collect what they inherit."""

from __future__ import annotations

import gc
import os
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
