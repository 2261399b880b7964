"""`Searcher`: answer text→image, image→text and image→image queries against a published index.

The CLI, the Python API and the HTTP server all query through this one class. It is safe to share between
threads: a published snapshot is opened into one immutable `_Snapshot` and swapped in whole, so a query runs
against one generation from start to end while `refresh` picks up a newer one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from clipdex.retrieval.config import ModelSpec, sha256_file
from clipdex.retrieval.errors import IndexFormatError, InputError, ItemNotFoundError
from clipdex.retrieval.imaging.decode import ImageDecodeError, read_query_image
from clipdex.retrieval.model.weights import index_encoder_config
from clipdex.retrieval.paths import canonical, content_hash
from clipdex.retrieval.search.batching import Batcher, LRUCache
from clipdex.retrieval.search.query import Query, Term
from clipdex.retrieval.store.items import Kind
from clipdex.retrieval.store.manifest import MANIFEST, Manifest, read_manifest
from clipdex.retrieval.store.shards import shard_path

if TYPE_CHECKING:  # the encoder pulls in torch and open_clip: imported when a query first needs it
    from clipdex.retrieval.model.encoder import Encoder
    from clipdex.retrieval.search.filters import Filter

log = logging.getLogger(__name__)


class Target(str, Enum):
    IMAGES = "images"
    TEXTS = "texts"

    @property
    def kind(self) -> Kind:
        return Kind.IMAGE if self is Target.IMAGES else Kind.TEXT


@dataclass(frozen=True)
class Item:
    id: int
    kind: str
    path: str | None
    text: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


def results_json(
    query: str,
    target: Target,
    hits: list[Hit],
    terms: list[dict[str, Any]] | None = None,
    filter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one shape of a search answer: `clipdex search --json` prints it, the HTTP API returns it. `terms` lists
    a composed query's parts (`Query.describe`), `filter` how a filter was applied (`Searcher.filter_plan`)."""
    out: dict[str, Any] = {"query": query, "target": target.value}
    if terms is not None:
        out["terms"] = terms
    if filter is not None:
        out["filter"] = filter
    out["results"] = [h.to_json() for h in hits]
    return out


@dataclass
class _Snapshot:
    """One published generation, opened: FAISS indexes per target and the item table (an arrow table, looked up
    per hit: no Python object per item). Only the shard cache changes after opening."""

    manifest: Manifest
    stamp: tuple[int, int, int]
    indexes: dict[Target, Any]
    items: Any
    ids: np.ndarray
    shard: np.ndarray
    row: np.ndarray
    shards: dict[int, np.ndarray] = field(default_factory=dict)
    rows: Any = None  # every column of the item table, read when a filter first needs it
    filtered: dict[Any, np.ndarray] = field(default_factory=dict)  # recent filters' matching ids


class Searcher:
    """Opens one published snapshot of an index; the query model is the one the index was built with.

    >>> s = Searcher("photos.idx")
    >>> s.search_text("a dog on a beach", k=5)
    """

    def __init__(self, index_dir: str | Path, *, device: str = "auto", encoder: Encoder | None = None):
        self.dir = Path(index_dir)
        self.device = device
        self._encoder = encoder
        self._own_encoder = encoder is None
        self._lock = threading.RLock()  # reloads and loading the encoder
        self._snap: _Snapshot
        self._batching: tuple[Any, Batcher[str], Batcher[Any], LRUCache] | None = None
        self.reload()

    @property
    def manifest(self) -> Manifest:
        return self._snap.manifest

    def reload(self) -> None:
        """Open the snapshot the manifest names now (a writer may have published a newer one)."""
        with self._lock:
            for attempt in range(3):
                try:
                    stamp = _stamp(self.dir)  # before reading: a newer manifest is then never mistaken for this one
                except OSError:
                    read_manifest(self.dir)  # says clearly what is wrong with the directory
                    raise
                manifest = read_manifest(self.dir)
                try:
                    snap = _open_snapshot(self.dir, manifest, stamp, self.device)
                    break
                except FileNotFoundError:
                    if attempt == 2:  # a writer replaced the snapshot between our reads, three times over
                        raise IndexFormatError(
                            f"{self.dir}: snapshot files named in the manifest are missing; run `clipdex check "
                            f"--index {self.dir}` for details"
                        ) from None
            previous = getattr(self, "_snap", None)
            if previous is not None and self._own_encoder and _model_changed(previous.manifest.model, manifest.model):
                self._encoder = None  # `clipdex reindex` swapped the model: queries need the new one
            self._snap = snap

    def refresh(self) -> bool:
        """Reload when a newer snapshot was published (one stat of the manifest when none was); True if reloaded."""
        try:
            if _stamp(self.dir) == self._snap.stamp:
                return False
        except OSError:
            return False  # the manifest is being replaced: keep answering from the snapshot we have
        self.reload()
        return True

    @property
    def encoder(self) -> Encoder:
        with self._lock:
            if self._encoder is None:
                from clipdex.retrieval.model.encoder import load_encoder

                config, spec = index_encoder_config(self.dir, device=self.device)
                self._encoder = load_encoder(config, expect=spec)
            return self._encoder

    def count(self, target: Target) -> int:
        index = self._snap.indexes.get(target)
        return 0 if index is None else int(index.ntotal)

    def ids(self, target: Target) -> np.ndarray:
        """Ids of the searchable items of a kind, ascending."""
        snap = self._snap
        if snap.items is None:
            return np.zeros(0, dtype=np.int64)
        return snap.ids[snap.items["kind"].to_numpy(zero_copy_only=False) == target.kind.value]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored float32 vectors of these ids (unit length)."""
        return _fetch(self._snap, self.dir, np.asarray(ids, dtype=np.int64))

    def rows(self, ids: np.ndarray) -> list[dict[str, Any]]:
        """`id`, `kind`, `path`, `text`, `size` (bytes) and `link` (a caption's image) of these ids."""
        snap = self._snap
        table = snap.items.take(_positions(snap, self.dir, np.asarray(ids, dtype=np.int64)))
        keep = [c for c in ("id", "kind", "path", "text", "size", "link") if c in table.column_names]
        return table.select(keep).to_pylist()

    def ann_index(self, target: Target) -> Any:
        """The FAISS index searches of a kind use (for range searches); None when the kind is empty."""
        return self._snap.indexes.get(target)

    def _batchers(self) -> tuple[Batcher[str], Batcher[Any], LRUCache]:
        """Batchers and the text cache of the current encoder (new ones when `reindex` swapped the model)."""
        encoder = self.encoder
        current = self._batching
        if current is None or current[0] is not encoder:
            with self._lock:
                current = self._batching
                if current is None or current[0] is not encoder:
                    cache = LRUCache()
                    texts: Batcher[str] = Batcher(encoder.encode_texts, alone=cache.put)
                    images: Batcher[Any] = Batcher(lambda pixels: encoder.encode_images(_stack(pixels)))
                    current = self._batching = (encoder, texts, images, cache)
        return current[1], current[2], current[3]

    def embed_text(self, query: str) -> np.ndarray:
        if not query.strip():
            raise InputError("the query text is empty")
        texts, _, cache = self._batchers()
        cached = cache.get(query)
        return cached if cached is not None else texts(query)

    def search_text(self, query: str, *, k: int = 10, target: Target = Target.IMAGES) -> list[Hit]:
        return self.search_vectors(self.embed_text(query), k=k, target=target)[0]

    def search_image(
        self, image: str | Path | bytes | Image.Image, *, k: int = 10, target: Target = Target.IMAGES
    ) -> list[Hit]:
        """Search with an image file, its bytes, or a decoded image; files and bytes are decoded as indexing
        decodes them (pixel limit, EXIF orientation, aspect guard)."""
        return self.search_vectors(self.embed_image(image), k=k, target=target)[0]

    def embed_image(self, image: str | Path | bytes | Image.Image) -> np.ndarray:
        encoder = self.encoder
        if isinstance(image, Image.Image):
            return self._encode_pil(encoder, image.convert("RGB"))
        if isinstance(image, bytes):
            return self._embed_bytes(image, "the query image")
        path = canonical(image)
        return self._embed_bytes(read_query_image(path), f"query image {path}")

    def _embed_bytes(self, data: bytes, what: str) -> np.ndarray:
        """An image file's bytes decoded as indexing decodes them, then encoded; `what` names it in errors."""
        encoder = self.encoder
        try:
            return self._encode_pil(encoder, encoder.decode_options().decode(data).image)
        except ImageDecodeError as e:
            raise InputError(f"cannot read {what}: {e}") from e

    def _encode_pil(self, encoder: Encoder, image: Image.Image) -> np.ndarray:
        _, images, _ = self._batchers()
        return images(encoder.preprocess(image))  # preprocessing in the caller's thread, beside others' forwards

    def search_vectors(self, queries: np.ndarray, *, k: int = 10, target: Target = Target.IMAGES) -> list[list[Hit]]:
        """Top-k hits for each L2-normalised query vector."""
        if k < 1:
            raise InputError(f"k must be at least 1 (got {k})")
        snap = self._snap
        try:
            return _search(snap, self.dir, queries, k, target)
        except FileNotFoundError:  # a writer published since we opened and cleaned up what we were reading
            self.reload()
            return _search(self._snap, self.dir, queries, k, target)

    def search(
        self,
        query: Query,
        *,
        k: int = 10,
        target: Target = Target.IMAGES,
        include_self: bool = False,
        dedup: float | None = None,
        where: Filter | None = None,
    ) -> list[Hit]:
        """Rank by cosine with the query's composed vector (see `retrieval.query`).

        Unless `include_self`, the indexed items the query is made of are left out: `like` ids, and the indexed images
        a query image is (the item at its path, and any whose content equals it, so copies go too). With `dedup`, a hit
        whose cosine with a better kept hit reaches it is left out too. With `where`, only items the filter keeps
        are ranked (`retrieval.filters`): exactly over them when they are few (`filter_plan` says which way)."""
        if k < 1:
            raise InputError(f"k must be at least 1 (got {k})")
        if dedup is not None and not -1.0 <= dedup <= 1.0:
            raise InputError(f"the dedup threshold is a cosine between -1 and 1 (got {dedup})")
        snap = self._snap
        files = _read_query_files(query)  # each query image file read once, to embed it and to recognise it
        vector = self.embed_query(query, files)
        exclude = set() if include_self else self._own_items(snap, query, files)
        allowed = self.filter_ids(where, target) if where is not None and where.selects else None
        want = k + len(exclude)
        while True:
            found, exhausted = self._candidates(snap, vector, want, target, allowed)
            kept = [h for h in found if h.id not in exclude]
            if dedup is not None:
                kept = _dedup(snap, self.dir, kept, dedup)
            if len(kept) >= k or exhausted:
                break
            want *= 2  # exclusions and collapsed near-duplicates took places: look further down
        if where is not None and where.min_score is not None:
            kept = [h for h in kept if h.score >= where.min_score]
        return [replace(h, rank=r + 1) for r, h in enumerate(kept[:k])]

    def filter_ids(self, where: Filter, target: Target) -> np.ndarray:
        """Ids of the items of a kind that the filter keeps."""
        from clipdex.retrieval.search.filters import matching_ids

        snap = self._snap
        if snap.items is None:
            return np.zeros(0, dtype=np.int64)
        key = (where.where, where.in_folder, where.after, where.before, target)
        found = snap.filtered.get(key)
        if found is None:  # the same filter again (paging, a new query text) costs nothing on the same snapshot
            if snap.rows is None:
                snap.rows = _read(self.dir / snap.manifest.snapshot.files["items"], pq.read_table)
            found = matching_ids(snap.rows, where, target.kind.value)
            if len(snap.filtered) >= 32:
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # another thread evicted first
                    snap.filtered.pop(next(iter(snap.filtered)))
            snap.filtered[key] = found
        return found

    def filter_plan(self, where: Filter, target: Target) -> dict[str, Any]:
        """How a filtered search runs: `matched` items, searched `exact`ly (no more of them than exact search
        covers, or an exact index) or through the `ann` index, deep enough to find k of them."""
        matched = len(self.filter_ids(where, target)) if where.selects else self.count(target)
        return {
            **where.to_json(),
            "matched": matched,
            "method": "exact" if self._filter_exact(target, matched) else "ann",
        }

    def _filter_exact(self, target: Target, matched: int) -> bool:
        from clipdex.retrieval import ann

        index = self._snap.indexes.get(target)
        return index is None or matched <= ann.EXACT_MAX or ann.is_exact(index)

    def _candidates(
        self, snap: _Snapshot, vector: np.ndarray, want: int, target: Target, allowed: np.ndarray | None
    ) -> tuple[list[Hit], bool]:
        """The best `want` hits (among `allowed` ids, if given) and whether there are no more to be had."""
        if allowed is None:
            found = self.search_vectors(vector, k=want, target=target)[0]
            return found, len(found) < want
        if not len(allowed):
            return [], True
        if self._filter_exact(target, len(allowed)):
            scores = np.concatenate(
                [_fetch(snap, self.dir, allowed[i : i + 65536]) @ vector[0] for i in range(0, len(allowed), 65536)]
            )
            order = np.argsort(-scores, kind="stable")[:want]
            return _hits(snap, self.dir, scores[order], allowed[order]), len(order) < want
        total = self.count(target)
        depth = min(total, int(np.ceil(2 * want * total / len(allowed))))  # deep enough to hold `want` of them
        while True:
            found = self.search_vectors(vector, k=depth, target=target)[0]
            got = np.array([h.id for h in found], dtype=np.int64)
            at = np.minimum(np.searchsorted(allowed, got), len(allowed) - 1)  # `allowed` is sorted: no pass over it
            inside = allowed[at] == got
            kept = [h for h, ok in zip(found, inside, strict=True) if ok]
            if len(kept) >= want or depth >= total:
                return kept[:want], len(kept) < want
            depth = min(total, depth * 2)

    def embed_query(self, query: Query, files: dict[Path, tuple[Path, bytes]] | None = None) -> np.ndarray:
        """The query's vector: a plain term's embedding as it is, else the normalised weighted sum of the terms'.
        `files` holds image files already read (`_read_query_files`)."""
        files = _read_query_files(query) if files is None else files
        vectors = [self._embed_term(t, files) for t in query.terms]
        if query.is_plain:
            return vectors[0]
        total = np.sum([t.weight * v[0].astype(np.float64) for t, v in zip(query.terms, vectors, strict=True)], axis=0)
        norm = float(np.linalg.norm(total))
        if norm < 1e-6:
            raise InputError("the query's terms cancel out (their weighted sum is zero); change a weight or a term")
        return (total / norm).astype(np.float32)[None, :]

    def _embed_term(self, term: Term, files: dict[Path, tuple[Path, bytes]]) -> np.ndarray:
        if term.text is not None:
            return self.embed_text(term.text)
        if term.item is not None:
            snap = self._snap
            _position(snap, term.item)  # a clear error for an unknown id
            return _fetch(snap, self.dir, np.array([term.item], dtype=np.int64))
        if term.image is not None:
            path, data = files[term.image]
            return self._embed_bytes(data, f"query image {path}")
        assert term.data is not None
        return self.embed_image(term.data)

    def _own_items(self, snap: _Snapshot, query: Query, files: dict[Path, tuple[Path, bytes]]) -> set[int]:
        """Indexed items a query is made of: `like` ids, and the images a positive query image is, by path or content."""
        own = {t.item for t in query.terms if t.item is not None and t.weight > 0}
        if snap.items is None:
            return own
        paths, hashes = set(), set()
        for t in query.terms:
            if t.weight <= 0 or (t.image is None and t.data is None):
                continue
            if t.image is not None:
                path, data = files[t.image]
                paths.add(str(path))
                hashes.add(content_hash(data))
            else:
                hashes.add(content_hash(t.data))  # type: ignore[arg-type]
        same = pc.is_in(snap.items["path"], value_set=pa.array(sorted(paths), pa.string()))
        if hashes and "hash" in snap.items.column_names:
            same = pc.or_kleene(same, pc.is_in(snap.items["hash"], value_set=pa.array(sorted(hashes), pa.string())))
        same = pc.and_kleene(same, pc.equal(snap.items["kind"], Kind.IMAGE.value))
        own.update(snap.items.filter(pc.fill_null(same, False))["id"].to_pylist())
        return own

    def item(self, item_id: int) -> Item:
        """The item with this id, as search results show it."""
        snap = self._snap
        pos = _position(snap, item_id)
        row = snap.items.slice(pos, 1).to_pylist()[0]
        return Item(id=item_id, kind=row["kind"], path=row["path"], text=row["text"])

    def similar(self, item_id: int, *, k: int = 10) -> list[Hit]:
        """Items of the same kind nearest to this one's stored vector (image→image, text→text), itself left out."""
        if k < 1:
            raise InputError(f"k must be at least 1 (got {k})")
        snap = self._snap
        pos = _position(snap, item_id)
        target = Target.IMAGES if snap.items["kind"][pos].as_py() == Kind.IMAGE.value else Target.TEXTS
        return self.search(Query.build(like=item_id), k=k, target=target)


def _read_query_files(query: Query) -> dict[Path, tuple[Path, bytes]]:
    """Each image file a query names, as given → (its canonical path, its bytes), read once."""
    files = {}
    for t in query.terms:
        if t.image is not None and t.image not in files:
            path = canonical(t.image)
            files[t.image] = (path, read_query_image(path))
    return files


def _dedup(snap: _Snapshot, index_dir: Path, hits: list[Hit], threshold: float) -> list[Hit]:
    """Best first, keep a hit unless its cosine with a hit already kept reaches `threshold`."""
    if len(hits) < 2:
        return hits
    vectors = _fetch(snap, index_dir, np.array([h.id for h in hits], dtype=np.int64))
    kept: list[int] = []
    for i in range(len(hits)):
        if not kept or float(np.max(vectors[kept] @ vectors[i])) < threshold:
            kept.append(i)
    return [hits[i] for i in kept]


def _stack(pixels: list[Any]) -> Any:
    import torch

    return torch.stack(pixels)


def _stamp(index_dir: Path) -> tuple[int, int, int]:
    """What changes whenever the manifest is replaced (it is written to a new file and renamed)."""
    st = (index_dir / MANIFEST).stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _model_changed(old: ModelSpec, new: ModelSpec) -> bool:
    return (old.name, old.pretrained, old.checkpoint_sha256) != (new.name, new.pretrained, new.checkpoint_sha256)


def _open_snapshot(index_dir: Path, manifest: Manifest, stamp: tuple[int, int, int], device: str) -> _Snapshot:
    from clipdex.retrieval import ann

    files = manifest.snapshot.files
    _verify(index_dir, files, manifest.snapshot.sha256)
    indexes: dict[Target, Any] = {}
    for target in Target:
        name = files.get(target.value)
        if name:
            params = manifest.ann.get(target.value, {}).get("params", "")
            index = _read(index_dir / name, lambda p, params=params: ann.read_index(p, params=params))
            indexes[target] = ann.place(index, _device_name(device))
    empty = np.zeros(0, dtype=np.int64)
    items, ids, shard, row = None, empty, empty, empty
    if "items" in files:
        table = _read(index_dir / files["items"], _read_items)
        items = table.filter(pc.equal(table["status"], "ok"))
        ids = items["id"].to_numpy()
        shard = items["shard"].to_numpy(zero_copy_only=False)
        row = items["row"].to_numpy(zero_copy_only=False)
    return _Snapshot(manifest, stamp, indexes, items, ids, shard, row)


def _device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"  # no torch import for the common case
    from clipdex.retrieval.model.encoder import resolve_device

    return str(resolve_device(device))


def _search(snap: _Snapshot, index_dir: Path, queries: np.ndarray, k: int, target: Target) -> list[list[Hit]]:
    from clipdex.retrieval import ann

    index = snap.indexes.get(target)
    if index is None or index.ntotal == 0:
        return [[] for _ in range(len(queries))]
    k = min(k, int(index.ntotal))
    scores, ids = ann.search_reranked(index, queries, k, lambda ids: _fetch(snap, index_dir, ids))
    return [_hits(snap, index_dir, s, i) for s, i in zip(scores, ids, strict=True)]


def _position(snap: _Snapshot, item_id: int) -> int:
    pos = int(np.searchsorted(snap.ids, item_id))
    if pos >= len(snap.ids) or int(snap.ids[pos]) != item_id:
        raise ItemNotFoundError(f"no item with id {item_id} in this index")
    return pos


def _positions(snap: _Snapshot, index_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Rows of the item table holding `ids`; an id the table lacks means the snapshot is damaged."""
    pos = np.minimum(np.searchsorted(snap.ids, ids), max(len(snap.ids) - 1, 0))
    if len(ids) and (not len(snap.ids) or not np.array_equal(snap.ids[pos], ids)):
        raise IndexFormatError(
            f"{index_dir}: the FAISS index holds ids missing from the item table; run `clipdex check --index "
            f"{index_dir}`"
        )
    return pos


def _fetch(snap: _Snapshot, index_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Stored vectors of the given ids, read from memory-mapped shards (for exact re-ranking)."""
    pos = _positions(snap, index_dir, ids)
    out = np.empty((len(ids), snap.manifest.dim), dtype=np.float32)
    for shard in np.unique(snap.shard[pos]).tolist():
        vectors = snap.shards.get(shard)
        if vectors is None:  # two threads may both open it: the same read-only map, either one kept
            path = shard_path(index_dir, int(shard))
            vectors = _read(path, lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
            snap.shards[shard] = vectors
        mask = snap.shard[pos] == shard
        out[mask] = vectors[snap.row[pos][mask]]
    return out


def _hits(snap: _Snapshot, index_dir: Path, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
    keep = ids >= 0
    scores, ids = scores[keep], ids[keep]
    pos = _positions(snap, index_dir, ids)
    rows = snap.items.take(pos).to_pylist() if len(ids) else []
    return [
        Hit(rank=r + 1, score=float(s), id=int(i), kind=row["kind"], path=row["path"], text=row["text"])
        for r, (s, i, row) in enumerate(zip(scores, ids, rows, strict=True))
    ]


def _read_items(path: Path) -> Any:
    """The item columns hits show; an image's `text` is its first linked caption."""
    names = pq.read_schema(path).names
    columns = ["id", "kind", "path", "text", "status", "shard", "row"] + [
        c for c in ("hash", "size", "link") if c in names
    ]
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
