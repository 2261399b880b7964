"""`Searcher`: answer text→image, image→text and image→image queries against a published index."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from clipdex.retrieval import ann
from clipdex.retrieval.config import sha256_file
from clipdex.retrieval.encoder import Encoder, load_encoder, resolve_device
from clipdex.retrieval.errors import IndexFormatError, InputError
from clipdex.retrieval.imaging import ImageDecodeError
from clipdex.retrieval.items import Kind
from clipdex.retrieval.manifest import index_encoder_config, read_manifest
from clipdex.retrieval.paths import canonical
from clipdex.retrieval.shards import shard_path

log = logging.getLogger(__name__)


class Target(str, Enum):
    IMAGES = "images"
    TEXTS = "texts"

    @property
    def kind(self) -> Kind:
        return Kind.IMAGE if self is Target.IMAGES else Kind.TEXT


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: int
    kind: str
    path: str | None
    text: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Searcher:
    """Opens one published snapshot of an index; the query model is the one the index was built with.

    >>> s = Searcher("photos.idx")
    >>> s.search_text("a dog on a beach", k=5)
    """

    def __init__(self, index_dir: str | Path, *, device: str = "auto", encoder: Encoder | None = None):
        self.dir = Path(index_dir)
        self.device = device
        self._encoder = encoder
        self.reload()

    def reload(self) -> None:
        """Open the snapshot the manifest names now (a writer may have published a newer one)."""
        for attempt in range(3):
            self.manifest = read_manifest(self.dir)
            try:
                self._open_snapshot()
                return
            except FileNotFoundError:
                if attempt == 2:  # a writer replaced the snapshot between our reads, three times over
                    raise IndexFormatError(
                        f"{self.dir}: snapshot files named in the manifest are missing; run `clipdex check --index "
                        f"{self.dir}` for details"
                    ) from None

    def _open_snapshot(self) -> None:
        files = self.manifest.snapshot.files
        _verify(self.dir, files, self.manifest.snapshot.sha256)
        self._indexes: dict[Target, Any] = {}
        tuned = self.manifest.ann
        for target in Target:
            name = files.get(target.value)
            if name:
                params = tuned.get(target.value, {}).get("params", "")
                index = _read(self.dir / name, lambda p, params=params: ann.read_index(p, params=params))
                self._indexes[target] = ann.place(index, str(resolve_device(self.device)))
        self._ids = np.zeros(0, dtype=np.int64)
        self._items: Any = None  # an arrow table, looked up per hit: no Python object per item
        if "items" in files:
            table = _read(self.dir / files["items"], _read_items)
            self._items = table.filter(pc.equal(table["status"], "ok"))
            self._ids = self._items["id"].to_numpy()
            self._shard = self._items["shard"].to_numpy(zero_copy_only=False)
            self._row = self._items["row"].to_numpy(zero_copy_only=False)
        self._shards: dict[int, np.ndarray] = {}

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            config, spec = index_encoder_config(self.dir, device=self.device)
            self._encoder = load_encoder(config, expect=spec)
        return self._encoder

    def count(self, target: Target) -> int:
        index = self._indexes.get(target)
        return 0 if index is None else int(index.ntotal)

    def search_text(self, query: str, *, k: int = 10, target: Target = Target.IMAGES) -> list[Hit]:
        if not query.strip():
            raise InputError("the query text is empty")
        return self.search_vectors(self.encoder.encode_texts([query]), k=k, target=target)[0]

    def search_image(
        self, image: str | Path | bytes | Image.Image, *, k: int = 10, target: Target = Target.IMAGES
    ) -> list[Hit]:
        """Search with an image file, its bytes, or a decoded image; files and bytes are decoded as indexing
        decodes them (pixel limit, EXIF orientation, aspect guard)."""
        return self.search_vectors(self.embed_image(image), k=k, target=target)[0]

    def embed_image(self, image: str | Path | bytes | Image.Image) -> np.ndarray:
        if isinstance(image, Image.Image):
            return self.encoder.encode_pil([image.convert("RGB")])
        options = self.encoder.decode_options()
        if isinstance(image, bytes):
            try:
                return self.encoder.encode_pil([options.decode(image).image])
            except ImageDecodeError as e:
                raise InputError(f"cannot read the query image: {e}") from e
        path = canonical(image)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputError(f"query image not found: {path}") from None
        except OSError as e:
            raise InputError(f"cannot read query image {path}: {e.strerror or e}") from e
        try:
            return self.encoder.encode_pil([options.decode(data).image])
        except ImageDecodeError as e:
            raise InputError(f"cannot read query image {path}: {e}") from e

    def search_vectors(self, queries: np.ndarray, *, k: int = 10, target: Target = Target.IMAGES) -> list[list[Hit]]:
        """Top-k hits for each L2-normalised query vector."""
        if k < 1:
            raise InputError(f"k must be at least 1 (got {k})")
        try:
            return self._search(queries, k, target)
        except FileNotFoundError:  # a writer published since we opened and cleaned up what we were reading
            self.reload()
            return self._search(queries, k, target)

    def _search(self, queries: np.ndarray, k: int, target: Target) -> list[list[Hit]]:
        index = self._indexes.get(target)
        if index is None or index.ntotal == 0:
            return [[] for _ in range(len(queries))]
        k = min(k, int(index.ntotal))
        scores, ids = ann.search_reranked(index, queries, k, self._fetch)
        return [self._hits(s, i) for s, i in zip(scores, ids, strict=True)]

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the item table holding `ids`; an id the table lacks means the snapshot is damaged."""
        pos = np.minimum(np.searchsorted(self._ids, ids), max(len(self._ids) - 1, 0))
        if len(ids) and (not len(self._ids) or not np.array_equal(self._ids[pos], ids)):
            raise IndexFormatError(
                f"{self.dir}: the FAISS index holds ids missing from the item table; run `clipdex check --index "
                f"{self.dir}`"
            )
        return pos

    def _fetch(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of the given ids, read from memory-mapped shards (for exact re-ranking)."""
        pos = self._positions(ids)
        out = np.empty((len(ids), self.manifest.dim), dtype=np.float32)
        for shard in np.unique(self._shard[pos]).tolist():
            if shard not in self._shards:
                path = shard_path(self.dir, int(shard))
                self._shards[shard] = _read(path, lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
            mask = self._shard[pos] == shard
            out[mask] = self._shards[shard][self._row[pos][mask]]
        return out

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        pos = self._positions(ids)
        rows = self._items.take(pos).to_pylist() if len(ids) else []
        return [
            Hit(rank=r + 1, score=float(s), id=int(i), kind=row["kind"], path=row["path"], text=row["text"])
            for r, (s, i, row) in enumerate(zip(scores, ids, rows, strict=True))
        ]


def _read_items(path: Path) -> Any:
    """The item columns hits show; an image's `text` is its first linked caption."""
    names = pq.read_schema(path).names
    columns = ["id", "kind", "path", "text", "status", "shard", "row"]
    table = pq.read_table(path, columns=columns + (["caption"] if "caption" in names else []))
    if "caption" in names:  # format 1 stored the caption in `text` already
        text = pc.if_else(pc.equal(table["kind"], "image"), table["caption"], table["text"])
        table = table.set_column(columns.index("text"), "text", text).drop_columns(["caption"])
    return table


_VERIFY_BELOW = 512 << 20  # larger files are left to `clipdex check`, so that opening stays fast


def _verify(index_dir: Path, files: dict[str, str], checksums: dict[str, str]) -> None:
    """Refuse damaged snapshot files rather than return silently wrong results."""
    for key, name in files.items():
        path = index_dir / name
        small = path.is_file() and path.stat().st_size < _VERIFY_BELOW
        if key in checksums and small and sha256_file(path) != checksums[key]:
            raise IndexFormatError(f"{path} is damaged (checksum mismatch); run `clipdex check` and rebuild the index")


def _read(path: Path, reader: Any) -> Any:
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        return reader(path)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise IndexFormatError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); rebuild the index") from e
