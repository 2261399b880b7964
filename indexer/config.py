"""What an indexing run is asked to do (`IndexConfig`), what it reports (`Summary`), and how it shows progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from clipdex.retrieval.config import EncoderConfig
from clipdex.retrieval.imaging.decode import DEFAULT_MAX_PIXELS
from clipdex.retrieval.store.manifest import AnnSettings


@dataclass(frozen=True)
class IndexConfig:
    paths: tuple[Path, ...]
    index_dir: Path
    texts: Path | tuple[Path, ...] | None = None  # caption files, one or several
    text_column: str | None = None
    image_column: str | None = None
    encoder: EncoderConfig | None = None  # None: the index's own model, or the default for a new index
    device: str = "auto"
    runtime: str | None = None  # auto, onnx or torch: what runs the forward (retrieval.model.runtime)
    precision: str | None = None  # fp32 or int8 (retrieval.model.precision); None: the index's own, fp32 when new
    batch_size: int = 64
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    commit_every: int = 16  # batches
    publish_every_s: float = 60.0
    ann: AnnSettings | None = None  # None: keep the index's settings (automatic for a new one)
    exclude: tuple[str, ...] = ()  # globs of files and folders not to index, relative to each root
    engine: str = "local"  # where decoding and encoding run: local, or ray (`indexer.engines`)
    ray_address: str | None = None
    prune_missing: bool = False  # remove the items of roots and folders that cannot be read, instead of keeping them
    ocr: bool | None = None  # read the words in images (True), stop (False); None: as the index does
    defer: frozenset[str] = frozenset()  # canonical paths left as they are this run (a file still being written)


@dataclass
class Summary:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    deferred: int = 0  # files left for a later run (`IndexConfig.defer`)
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things the user should know that are not failures
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went: scan, decode wait, encode, write

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def to_json(self) -> dict[str, int]:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "failed": self.failed,
        }


class Progress(Protocol):
    def start(self, what: str, total: int | None) -> None: ...
    def advance(self, n: int) -> None: ...


class NoProgress:
    def start(self, what: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass
