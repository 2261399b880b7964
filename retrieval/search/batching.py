"""Encode concurrent queries together: one model forward for everything that arrived while the last one ran.

No thread of its own: a caller that finds the model idle becomes the leader and encodes all queued inputs (its own
among them) in one batch; the others wait for their row. A lone query is encoded alone, exactly as before; under
load the batch amortises reading the weights (text) and fills the matrix units (images). Rows of one batch equal
lone encodings up to float rounding (a few 1e-7 per coordinate), since the matrix kernels block differently.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class _Request(Generic[T]):
    item: T
    done: bool = False
    vector: np.ndarray | None = None
    error: BaseException | None = field(default=None)


class Batcher(Generic[T]):
    def __init__(
        self,
        encode: Callable[[list[T]], np.ndarray],
        *,
        max_batch: int = 32,
        alone: Callable[[T, np.ndarray], None] | None = None,
    ):
        """`alone` is told of every input that was encoded by itself (what a lone caller would get, bit for bit)."""
        self._encode = encode
        self._max = max_batch
        self._alone = alone
        self._cv = threading.Condition()
        self._queue: list[_Request[T]] = []
        self._busy = False

    def __call__(self, item: T) -> np.ndarray:
        """The encoding of one input, shape (1, dim)."""
        request = _Request(item)
        with self._cv:
            self._queue.append(request)
        while True:
            with self._cv:
                while not request.done and self._busy:
                    self._cv.wait()
                if request.done:
                    break
                self._busy = True
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            try:
                vectors = self._encode([r.item for r in batch])
                for r, v in zip(batch, vectors, strict=True):
                    r.vector = v[None, :]
                if len(batch) == 1 and self._alone is not None:
                    self._alone(batch[0].item, vectors[:1])
            except BaseException as e:  # each waiter gets the error of the batch it was in
                for r in batch:
                    r.error = e
            finally:
                with self._cv:
                    for r in batch:
                        r.done = True
                    self._busy = False
                    self._cv.notify_all()
        if request.error is not None:
            raise request.error
        assert request.vector is not None
        return request.vector


class LRUCache:
    """A few thousand recent query vectors: the page searches as you type, and people search again."""

    def __init__(self, size: int = 4096):
        self._size = size
        self._data: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
                return value.copy()
            return None

    def put(self, key: Hashable, value: np.ndarray) -> None:
        with self._lock:
            self._data[key] = value.copy()
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)
