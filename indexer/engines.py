"""Where decoding and encoding run: here (`local`, the default) or on a Ray cluster through Ray Data (`ray`).

An engine turns file paths into decoded items and texts into vectors. Whatever the engine, results come back to
the one writer in this process in input order, and the writer commits them exactly as a local run does: the same
ids, the same vectors, the same crash safety (what is committed stays; a re-run encodes only what is missing).
The local engine decodes in DataLoader workers and leaves encoding to the caller, which first drops content it
already holds; the Ray engine decodes and encodes on the cluster (`indexer.ray_engine`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from clipdex.retrieval.errors import InputError
from clipdex.retrieval.imaging.loader import Decoded, ImageFiles, default_workers, iter_decoded

if TYPE_CHECKING:
    from clipdex.retrieval.model.encoder import Encoder

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineConfig:
    name: str = "local"
    address: str | None = None  # ray: None starts a local Ray; "auto" or host:port joins a running cluster
    workers: int | None = None  # local: decode processes (default: cores - 1)

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise InputError(f"unknown engine {self.name!r}: use one of {', '.join(ENGINES)}")
        if self.address is not None and self.name != "ray":
            raise InputError("--ray-address needs --engine ray")


class Engine(Protocol):
    text_chunk: int  # texts handed to `encode_texts` at a time (a commit each)

    def images(
        self, paths: Sequence[Path], *, known_hashes: frozenset[str], max_pixels: int, batch_size: int
    ) -> Iterator[list[Decoded]]:
        """Decoded items in the order of `paths`, a batch at a time: each has `vector` set, or `pixels` for the
        caller to encode, or neither (an error, or a hash in `known_hashes`, which is not decoded)."""
        ...

    def encode_texts(self, texts: list[str], *, batch_size: int) -> np.ndarray: ...

    def close(self) -> None: ...


class LocalEngine:
    text_chunk = 256

    def __init__(self, encoder: Encoder, workers: int | None = None):
        self.encoder = encoder
        self.workers = workers if workers is not None else default_workers()

    def images(
        self, paths: Sequence[Path], *, known_hashes: frozenset[str], max_pixels: int, batch_size: int
    ) -> Iterator[list[Decoded]]:
        dataset = ImageFiles(
            paths, self.encoder.preprocess, known_hashes=known_hashes, options=self.encoder.decode_options(max_pixels)
        )
        yield from iter_decoded(dataset, batch_size=batch_size, workers=min(self.workers, len(paths)))

    def encode_texts(self, texts: list[str], *, batch_size: int) -> np.ndarray:
        return self.encoder.encode_texts(texts, batch_size=batch_size)

    def close(self) -> None:
        pass


def open_engine(config: EngineConfig, encoder: Encoder) -> Engine:
    if config.name == "ray":
        from clipdex.indexer.ray_engine import RayEngine

        return RayEngine(encoder, address=config.address)
    return LocalEngine(encoder, config.workers)


def encode_decoded(encoder: Encoder, batch: list[Decoded]) -> None:
    """Encode, in place, the items of a batch that came back as pixels."""
    todo = [d for d in batch if d.pixels is not None and d.vector is None]
    if not todo:
        return
    for d, vector in zip(todo, encoder.encode_pixels([d.pixels for d in todo]), strict=True):  # type: ignore[misc]
        d.vector, d.pixels = vector, None
