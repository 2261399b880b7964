"""Read, hash and decode image files in worker processes.

Each file is read once: the bytes are hashed (to spot unchanged, renamed and duplicate files)
and, unless the hash is already known, decoded and preprocessed for the encoder.

Indexing and evaluation decode in a process pool of their own, which imports no torch (with the ONNX runtime an
indexing run then never loads it). Fine-tuning's seeded random augmentation keeps torch's DataLoader, which seeds
each worker's generators from one seed.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import itertools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.retrieval.errors import ClipdexError, ImageDecodeError
from clipdex.retrieval.imaging.decode import MAX_FILE_BYTES, DecodeOptions, PhotoMeta
from clipdex.retrieval.imaging.files import NotRegularFile, read_regular
from clipdex.retrieval.paths import content_hash


@dataclass
class Decoded:
    index: int
    size: int | None = None
    mtime: float | None = None
    hash: str | None = None
    width: int | None = None
    height: int | None = None
    meta: PhotoMeta | None = None
    pixels: Any = None  # the preprocessed image: a numpy array, or a torch tensor from torchvision's transforms
    error: str | None = None
    vanished: bool = False
    vector: np.ndarray | None = None  # set when the engine encoded it (Ray); else the caller encodes `pixels`


class ImageFiles:
    """The files to decode, by position: what a worker reads (a torch Dataset in all but name)."""

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable[[Any], Any],
        *,
        known_hashes: frozenset[str] = frozenset(),
        options: DecodeOptions,
    ):
        self.paths = paths
        self.transform = transform
        self.known_hashes = known_hashes
        self.options = options

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Decoded:
        path = self.paths[i]
        try:
            data, st = read_regular(path, MAX_FILE_BYTES)
            if st.st_size > MAX_FILE_BYTES:  # nothing of it was read
                return Decoded(
                    i, size=st.st_size, mtime=st.st_mtime, error=f"file is {st.st_size} bytes, over the 1 GiB limit"
                )
        except FileNotFoundError:
            return Decoded(i, vanished=True, error="file vanished before it could be read")
        except NotRegularFile as e:
            return Decoded(i, error=e.strerror)
        except OSError as e:
            return Decoded(i, error=f"cannot read file: {e.strerror or e}")
        if len(data) != st.st_size:
            return Decoded(i, error="file changed while it was being read")
        out = Decoded(i, size=st.st_size, mtime=st.st_mtime, hash=content_hash(data))
        if out.hash in self.known_hashes:
            return out
        try:
            decoded = self.options.decode(data)
            out.pixels = self.transform(decoded.image)
            out.width, out.height, out.meta = decoded.width, decoded.height, decoded.meta
        except ImageDecodeError as e:
            out.error = str(e)
        except Exception as e:  # a transform failing on an odd image must not stop the run
            out.error = f"preprocessing failed ({type(e).__name__}: {e})"
        return out


def _worker_init(_: int = 0) -> None:
    # Ctrl-C is the main process's to handle: it commits what is done, then stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "torch" in sys.modules:  # a torch transform: one thread per worker process
        sys.modules["torch"].set_num_threads(1)


def _as_list(batch: list[Decoded]) -> list[Decoded]:
    return batch


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def iter_decoded(
    dataset: ImageFiles,
    *,
    batch_size: int = 1,
    workers: int,
    batches: list[list[int]] | None = None,
    seed: int | None = None,
) -> Iterator[list[Decoded]]:
    """Decoded items in batches of `batch_size` in order, or exactly the index lists `batches`. With `seed`, the
    random transforms applied in the workers (training augmentation) are reproducible."""
    if batches is None and seed is None:
        order = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
        yield from _pooled(dataset, order, workers)
        return
    import torch
    from torch.utils.data import DataLoader

    loader: DataLoader[Decoded] = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=1 if batches is not None else batch_size,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_as_list,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
    )
    yield from loader


_files: ImageFiles | None = None  # a pool worker's dataset, inherited at fork
PART = 8  # photos a decoding worker decodes and sends back at a time (`_pooled`)


@contextlib.contextmanager
def _frozen_at_fork() -> Iterator[None]:
    """Every object of this process out of the garbage collector's reach while workers are forked from it, so that
    they never collect what they inherit. Cyclic garbage can hold an ONNX Runtime session whose threads were waiting
    on a condition variable at the fork: a worker collecting it waited forever to destroy that variable (met in the
    test suite, a decoding worker stuck in `pthread_cond_destroy` under a collection that Pillow's allocations
    started). The parent collects as before once its workers exist."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _start_worker(files: ImageFiles, parent: int) -> None:
    global _files
    _files = files
    _worker_init()
    _die_with(parent)


def _die_with(parent: int) -> None:
    """End this worker when the process that started it dies, even by SIGKILL: every worker holds the task pipe's
    write end too, so it would never see the pipe close, and would wait forever (what DataLoader's watchdog does)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _decode_batch(indices: list[int]) -> list[Decoded]:
    assert _files is not None
    return [_files[i] for i in indices]


def _pooled(dataset: ImageFiles, order: list[list[int]], workers: int) -> Iterator[list[Decoded]]:
    """The batches `order` names, decoded by `workers` forked processes (here when 0), in order. A worker that dies
    (a decoder crashing on a file) is an error.

    The workers decode `PART` photos at a time, and each may be a batch's worth of parts ahead of the consumer. A
    part's pixels come back through a pipe as a pickle, held twice while it is read; whole batches of 64 ViT-B photos
    in float32 held 50 MB twice each, four batches ahead per worker, and put an index run's peak memory above rclip's
    (benchmarks/RESULTS.md, issue 18). Decoding a photo takes a fraction of encoding it, so a batch ahead keeps the
    encoder fed."""
    if workers <= 0:
        for indices in order:
            yield [dataset[i] for i in indices]
        return
    parts = [
        (number, indices[i : i + PART]) for number, indices in enumerate(order) for i in range(0, len(indices), PART)
    ]
    ahead = workers * max(1, -(-max(map(len, order), default=1) // PART))  # a batch's parts per worker
    context = multiprocessing.get_context("fork")  # workers inherit the dataset and its preprocessing as they are
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(dataset, os.getpid()))
    todo = iter(parts)
    try:
        with _frozen_at_fork():  # a fork-context pool forks all its workers at the first submit
            first = [(n, pool.submit(_decode_batch, indices)) for n, indices in itertools.islice(todo, ahead)]
        pending: collections.deque[tuple[int, Future[list[Decoded]]]] = collections.deque(first)
        for number in range(len(order)):
            batch: list[Decoded] = []
            while pending and pending[0][0] == number:
                batch.extend(pending.popleft()[1].result())
                pending.extend((n, pool.submit(_decode_batch, indices)) for n, indices in itertools.islice(todo, 1))
            yield batch
    except BrokenProcessPool:
        raise ClipdexError(
            "an image decoding worker died (a decoder crashed on a file); run the command again"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
