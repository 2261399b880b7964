"""Vector shards: `vectors/NNNNNN.npy`, written once and never modified, and the live vectors they hold.

A shard is written atomically before the catalog rows that point at it are committed, so a crash leaves at
most a shard nobody references, which clean-up removes. Renamed and duplicate items share a (shard, row).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.retrieval.errors import IndexFormatError, disk_error
from clipdex.retrieval.store.atomic import TMP_SUFFIX, atomic_file

VECTORS = "vectors"
_CHUNK = 65536


def shard_path(index_dir: Path, shard: int) -> Path:
    return index_dir / VECTORS / f"{shard:06d}.npy"


def shard_numbers(index_dir: Path) -> list[int]:
    return sorted(int(p.stem) for p in (index_dir / VECTORS).glob("*.npy") if p.stem.isdigit())


class _HashingWriter:
    """A write-only file that hashes what passes through, so a shard is not read back to checksum it."""

    def __init__(self, f: Any):
        self._f = f
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._f.write(data)


def save_shard(path: Path, array: np.ndarray) -> str:
    """Write an .npy file atomically; return its sha256."""
    with atomic_file(path) as f:
        writer = _HashingWriter(f)
        np.save(writer, array, allow_pickle=False)  # type: ignore[arg-type]
    return writer.sha256.hexdigest()


def load_shard(path: Path) -> np.ndarray:
    """Memory-map a shard; a missing or unreadable one is an index problem with a fix, not a traceback."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise IndexFormatError(
            f"vector shard {path.name} is missing from {path.parent}; run `clipdex check --repair --index "
            f"{path.parent.parent}` to encode the items it held again"
        ) from None
    except (OSError, ValueError, EOFError) as e:  # numpy: EOFError for an empty file
        said = disk_error(e, path) if isinstance(e, OSError) else None
        if said is not None:  # a failing or unreadable disk is not a damaged index: no repair for it
            raise said from e
        raise IndexFormatError(
            f"vector shard {path} is damaged ({e}); run `clipdex check --repair --index {path.parent.parent}`"
        ) from e


def remove_unused(index_dir: Path, keep: Iterable[int]) -> list[int]:
    """Delete shard files not in `keep`, and temp files left by a crash; return the shards deleted."""
    keep = set(keep)
    gone = []
    for p in (index_dir / VECTORS).iterdir():
        if p.name.endswith(TMP_SUFFIX):
            p.unlink(missing_ok=True)
        elif p.suffix == ".npy" and p.stem.isdigit() and int(p.stem) not in keep:
            p.unlink(missing_ok=True)
            gone.append(int(p.stem))
    return gone


def gather(shards: np.ndarray, rows: np.ndarray, load: Callable[[int], np.ndarray], dim: int) -> np.ndarray:
    """The float32 vectors at these (shard, row) locations, in order; each shard is loaded once."""
    out = np.empty((len(rows), dim), dtype=np.float32)
    for shard in np.unique(shards).tolist():
        mask = shards == shard
        out[mask] = load(int(shard))[rows[mask]]
    return out


class LiveVectors:
    """The searchable vectors of one kind, read from shards on demand: never all in memory at once.

    Rows are kept sorted by id, so the same catalog gives the same iteration order."""

    def __init__(
        self, ids: np.ndarray, shards: np.ndarray, rows: np.ndarray, load: Callable[[int], np.ndarray], dim: int
    ):
        order = np.argsort(ids, kind="stable")
        self.ids = np.asarray(ids, dtype=np.int64)[order]
        self.shards = np.asarray(shards, dtype=np.int64)[order]
        self.rows = np.asarray(rows, dtype=np.int64)[order]
        self._load = load
        self.dim = dim
        self.chunk = _CHUNK  # rows per batch: a builder under a memory budget lowers it

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, only: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(float32 vectors, ids) shard by shard, optionally restricted to the ids in `only`."""
        keep = np.ones(len(self.ids), dtype=bool) if only is None else np.isin(self.ids, only)
        for shard in np.unique(self.shards[keep]).tolist():
            sel = keep & (self.shards == shard)
            data = self._load(int(shard))
            rows, ids = self.rows[sel], self.ids[sel]
            for start in range(0, len(rows), self.chunk):
                stop = start + self.chunk
                yield np.asarray(data[rows[start:stop]], dtype=np.float32), ids[start:stop]

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of the given ids, as float32; an id that is not live is an error."""
        pos = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        if len(ids) and (not len(self.ids) or not np.array_equal(self.ids[pos], ids)):
            missing = np.setdiff1d(ids, self.ids)[:3].tolist()
            raise IndexFormatError(f"ids {missing} have no stored vector; run `clipdex check`")
        return self._gather(pos)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if n >= len(self.ids):
            return self._gather(np.arange(len(self.ids)))
        return self._gather(np.sort(rng.choice(len(self.ids), size=n, replace=False)))

    def _gather(self, pos: np.ndarray) -> np.ndarray:
        return gather(self.shards[pos], self.rows[pos], self._load, self.dim)

    def changed_since(self, before: LiveVectors) -> np.ndarray:
        """Ids live in both whose vector location differs: items edited since `before`."""
        common, mine, theirs = np.intersect1d(self.ids, before.ids, assume_unique=True, return_indices=True)
        moved = (self.shards[mine] != before.shards[theirs]) | (self.rows[mine] != before.rows[theirs])
        return common[moved]
