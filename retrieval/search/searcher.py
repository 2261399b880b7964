"""`Searcher`: answer text→image, image→text and image→image queries against a published index.

The CLI, the Python API and the HTTP server all query through this one class. It is safe to share between
threads: a published snapshot is opened into one immutable `OpenSnapshot` and swapped in whole, so a query runs
against one generation from start to end while `refresh` picks up a newer one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from clipdex.retrieval.config import Kind
from clipdex.retrieval.errors import ImageDecodeError, IndexFormatError, InputError
from clipdex.retrieval.imaging.decode import read_query_image
from clipdex.retrieval.paths import canonical
from clipdex.retrieval.search import compose, opened
from clipdex.retrieval.search.batching import Batcher, LRUCache
from clipdex.retrieval.search.fusion import HYBRID_DEPTH, reciprocal_rank_fusion
from clipdex.retrieval.search.hits import Hit, Item, results_json
from clipdex.retrieval.search.opened import OpenSnapshot
from clipdex.retrieval.search.query import Query, Term
from clipdex.retrieval.search.relevant import RELEVANT_MAX, TOP, Cutoff, cutoff, sample_ids
from clipdex.retrieval.search.request import MODES, OFFLINE, SORTS
from clipdex.retrieval.store.columns import integers
from clipdex.retrieval.store.manifest import Manifest, read_manifest
from clipdex.retrieval.store.reader import manifest_stamp, read_file
from clipdex.retrieval.store.snapshot import read_parquet
from clipdex.retrieval.store.words import WordIndex

if TYPE_CHECKING:  # the encoder pulls in torch and open_clip: imported when a query first needs it
    from clipdex.retrieval.model.encoder import Encoder
    from clipdex.retrieval.search.filters import Filter
    from clipdex.retrieval.search.request import SearchRequest
    from clipdex.retrieval.search.rerank import Reranker

log = logging.getLogger(__name__)

Target = Kind  # a search's target is a kind of item: `Target.IMAGES is Kind.IMAGE`
__all__ = ["Hit", "Item", "Searcher", "Target", "results_json"]


class Searcher:
    """Opens one published snapshot of an index; the query model is the one the index was built with.

    >>> s = Searcher("photos.idx")
    >>> s.search_text("a dog on a beach", k=5)
    """

    def __init__(
        self,
        index_dir: str | Path,
        *,
        device: str = "auto",
        encoder: Encoder | None = None,
        runtime: str | None = None,
        warm: Iterable[str] = (),
    ):
        """`warm`: the model's towers ("text", "image") the first query will need, opened in a background thread
        while the snapshot is read (`_warm`)."""
        self.dir = Path(index_dir)
        self.device = device
        self.runtime = runtime  # auto, onnx or torch (retrieval.model.runtime); None: $CLIPDEX_RUNTIME, else auto
        self._encoder = encoder
        self._own_encoder = encoder is None
        self._lock = threading.RLock()  # reloads
        self._encoder_lock = threading.Lock()  # loading the encoder (never taken before `_lock`)
        self._snap: OpenSnapshot
        self._batching: tuple[Any, Batcher[str], Batcher[Any], LRUCache] | None = None
        self._reranker: tuple[str, Reranker] | None = None  # (the head's file, the head on the torch model)
        if warm and self._own_encoder:  # not a daemon: see OnnxEncoder.warm_later
            threading.Thread(target=self._warm, args=(tuple(warm),), name="clipdex-warm").start()
        self.reload()

    def _warm(self, towers: tuple[str, ...]) -> None:
        """Load an exported model and open its towers' sessions, beside the caller reading the snapshot: what a
        cold `clipdex search` would otherwise do after it. Only a model already exported for ONNX Runtime is
        warmed here; torch, an export still to make, or any error is left to the first query, which says it."""
        from clipdex.retrieval.model.choose import exported_index_encoder

        try:
            with self._encoder_lock:
                if self._encoder is None:
                    self._encoder = exported_index_encoder(  # type: ignore[assignment]  # the same interface
                        self.dir, device=self.device, runtime=self.runtime
                    )
                encoder = self._encoder
            if encoder is not None and hasattr(encoder, "warm"):
                encoder.warm(towers)
        except Exception:  # the first query meets it again and reports it
            log.debug("warming the encoder failed", exc_info=True)

    @property
    def manifest(self) -> Manifest:
        return self._snap.manifest

    def reload(self) -> None:
        """Open the snapshot the manifest names now (a writer may have published a newer one)."""
        with self._lock:
            for attempt in range(3):
                try:
                    stamp = manifest_stamp(self.dir)  # before reading: a newer manifest is never mistaken for this one
                except OSError:
                    read_manifest(self.dir)  # says clearly what is wrong with the directory
                    raise
                manifest = read_manifest(self.dir)
                try:
                    snap = opened.open_snapshot(self.dir, manifest, stamp, self.device)
                    break
                except FileNotFoundError:
                    if attempt == 2:  # a writer replaced the snapshot between our reads, three times over
                        raise IndexFormatError(
                            f"{self.dir}: snapshot files named in the manifest are missing; run `clipdex check "
                            f"--index {self.dir}` for details"
                        ) from None
            previous = getattr(self, "_snap", None)
            if previous is not None and self._own_encoder and not previous.manifest.model.same_model(manifest.model):
                with self._encoder_lock:
                    self._encoder = None  # `clipdex reindex` swapped the model: queries need the new one
            if self._reranker is not None and previous is not None:
                if self._reranker[0] != manifest.rerank or not previous.manifest.model.same_model(manifest.model):
                    self._reranker = None  # another head, or another model
                else:
                    self._reranker[1].forget()  # the same ids may name other files now
            self._snap = snap

    def refresh(self) -> bool:
        """Reload when a newer snapshot was published (one stat of the manifest when none was); True if reloaded."""
        try:
            if manifest_stamp(self.dir) == self._snap.stamp:
                return False
        except OSError:
            return False  # the manifest is being replaced: keep answering from the snapshot we have
        self.reload()
        return True

    @property
    def encoder(self) -> Encoder:
        with self._encoder_lock:
            if self._encoder is None:
                from clipdex.retrieval.model.choose import open_index_encoder

                self._encoder = open_index_encoder(self.dir, device=self.device, runtime=self.runtime)
            return self._encoder

    # -- what the snapshot holds ----------------------------------------------------------------------------------

    def count(self, target: Kind) -> int:
        index = self._snap.indexes.get(target)
        return 0 if index is None else int(index.ntotal)

    def ids(self, target: Kind) -> np.ndarray:
        """Ids of the searchable items of a kind, ascending."""
        return self._snap.items.of_kind(target)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored float32 vectors of these ids (unit length)."""
        return self._snap.items.vectors(np.asarray(ids, dtype=np.int64))

    def rows(self, ids: np.ndarray) -> list[dict[str, Any]]:
        """`id`, `kind`, `path`, `text`, `size` (bytes) and `link` (a caption's image) of these ids."""
        keep = ("id", "kind", "path", "text", "size", "link")
        return [{c: row[c] for c in keep if c in row} for row in self._snap.items.rows(ids)]

    def ann_index(self, target: Kind) -> Any:
        """The FAISS index searches of a kind use (for range searches); None when the kind is empty."""
        return self._snap.indexes.get(target)

    def item(self, item_id: int) -> Item:
        """The item with this id, as search results show it."""
        row = self._snap.items.row_of(item_id)
        return Item(id=item_id, kind=row["kind"], path=row["path"], text=row["text"])

    # -- embedding ------------------------------------------------------------------------------------------------

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

    def embed_query(self, query: Query, files: compose.QueryFiles | None = None) -> np.ndarray:
        """The query's vector: a plain term's embedding as it is, else the normalised weighted sum of the terms'.
        `files` holds image files already read (`compose.read_query_files`)."""
        files = compose.read_query_files(query) if files is None else files
        vectors = [self._embed_term(t, files) for t in query.terms]
        if query.is_plain:
            return vectors[0]
        total = np.sum([t.weight * v[0].astype(np.float64) for t, v in zip(query.terms, vectors, strict=True)], axis=0)
        norm = float(np.linalg.norm(total))
        if norm < 1e-6:
            raise InputError("the query's terms cancel out (their weighted sum is zero); change a weight or a term")
        return (total / norm).astype(np.float32)[None, :]

    def _embed_term(self, term: Term, files: compose.QueryFiles) -> np.ndarray:
        if term.text is not None:
            return self.embed_text(term.text)
        if term.item is not None:
            items = self._snap.items
            items.position(term.item)  # a clear error for an unknown id
            return items.vectors(np.array([term.item], dtype=np.int64))
        if term.image is not None:
            path, data = files[term.image]
            return self._embed_bytes(data, f"query image {path}")
        assert term.data is not None
        return self.embed_image(term.data)

    # -- searching ------------------------------------------------------------------------------------------------

    def search_text(self, query: str, *, k: int = 10, target: Kind = Kind.IMAGE) -> list[Hit]:
        return self.search_vectors(self.embed_text(query), k=k, target=target)[0]

    def search_image(
        self, image: str | Path | bytes | Image.Image, *, k: int = 10, target: Kind = Kind.IMAGE
    ) -> list[Hit]:
        """Search with an image file, its bytes, or a decoded image; files and bytes are decoded as indexing
        decodes them (pixel limit, EXIF orientation, aspect guard)."""
        return self.search_vectors(self.embed_image(image), k=k, target=target)[0]

    def search_vectors(self, queries: np.ndarray, *, k: int = 10, target: Kind = Kind.IMAGE) -> list[list[Hit]]:
        """Top-k hits for each L2-normalised query vector."""
        if k < 1:
            raise InputError(f"k must be at least 1 (got {k})")
        try:
            return opened.search(self._snap, queries, k, target)
        except FileNotFoundError:  # a writer published since we opened and cleaned up what we were reading
            self.reload()
            return opened.search(self._snap, queries, k, target)

    def search(
        self,
        query: Query,
        *,
        k: int = 10,
        target: Kind = Kind.IMAGE,
        include_self: bool = False,
        dedup: float | None = None,
        where: Filter | None = None,
        rerank: int | None = None,
        offline: str = "hide",
        sort: str = "score",
        relevant: bool = False,
        mode: str | None = None,
    ) -> list[Hit]:
        """Rank by cosine with the query's composed vector (see `retrieval.search.query`).

        Unless `include_self`, the indexed items the query is made of are left out: `like` ids, and the indexed images
        a query image is (the item at its path, and any whose content equals it, so copies go too). With `dedup`, a hit
        whose cosine with a better kept hit reaches it is left out too. With `where`, only items the filter keeps
        are ranked (`retrieval.search.filters`): exactly over them when they are few (`filter_plan` says which way).
        Items on a root or folder that could not be read at the last run (`Manifest.offline`) are left out, unless
        `offline` is "show": then they are kept, flagged `offline`. `sort` orders the k found (after retrieval, so
        it never changes which items are found): by score, date (capture time, else the file's mtime; `-date`
        newest first; undated last; each dated hit carries its `date`) or name (the file's name, else the text).
        With `rerank` K, the index's re-ranking head re-scores the top K of that ranking and orders them by its score
        (`rerank` on each of them); the hits after K keep their order.
        With `relevant`, `k` gives way to a cut-off that adapts to the query (`relevance_cutoff`): every hit scoring at
        least that, up to RELEVANT_MAX.
        `mode` ranks by meaning (semantic, the above), by the words of captions and of text read in the images
        (lexical: every word must match, ranked by BM25; `retrieval.store.words`) or by both, fused by reciprocal rank
        (hybrid: `retrieval.search.fusion`; `score` is the fused one, `semantic` the cosine); `search_mode` says which
        one runs by default. In lexical mode `relevant` returns every match."""
        if k < 1:
            raise InputError(f"k must be at least 1 (got {k})")
        if rerank is not None and rerank < 1:
            raise InputError(f"the number of results to re-rank must be at least 1 (got {rerank})")
        if dedup is not None and not -1.0 <= dedup <= 1.0:
            raise InputError(f"the dedup threshold is a cosine between -1 and 1 (got {dedup})")
        if offline not in OFFLINE:
            raise InputError(f"offline is hide or show (got {offline!r})")
        if sort not in SORTS:
            raise InputError(f"sort is one of {', '.join(SORTS)} (got {sort!r})")
        if relevant and rerank is not None:
            raise InputError("relevant cuts by the cosine score and rerank orders by another: use one of them")
        mode = self.search_mode(mode, query, target, rerank)
        snap = self._snap
        away = opened.offline_ids(snap)
        hidden = away if offline == "hide" else frozenset()
        allowed = self.filter_ids(where, target) if where is not None and where.selects else None
        min_score = where.min_score if where is not None else None
        if mode == "lexical":
            if min_score is not None:
                raise InputError("min_score is a cosine, which lexical search does not compute: use --mode hybrid")
            want = RELEVANT_MAX if relevant else k
            kept = self._lexical(snap, _words_of(query), target, want, hidden, allowed)
            if dedup is not None:
                kept = compose.dedup(snap.items, kept, dedup)
        else:
            depth = k if mode == "semantic" else max(k, HYBRID_DEPTH)
            kept, vector = self._semantic(
                snap, query, depth, target, include_self, dedup if mode == "semantic" else None, hidden, allowed,
                rerank, relevant,
            )  # fmt: skip
            if mode == "hybrid":
                lexical = self._lexical(
                    snap, _words_of(query), target, RELEVANT_MAX if relevant else depth, hidden, allowed
                )
                kept = self._fused(snap, kept, lexical, vector)
                if dedup is not None:
                    kept = compose.dedup(snap.items, kept, dedup)
            if min_score is not None:
                kept = [h for h in kept if (h.score if h.semantic is None else h.semantic) >= min_score]
        if away and offline == "show":
            kept = [replace(h, offline=True) if h.id in away else h for h in kept]
        shown = RELEVANT_MAX if relevant else k
        return [replace(h, rank=r + 1) for r, h in enumerate(self._sorted(snap, kept[:shown], sort))]

    def search_mode(self, mode: str | None, query: Query, target: Kind, rerank: int | None = None) -> str:
        """The mode a search runs in: the one asked for (lexical and hybrid take a plain text query), else hybrid for
        a text query on an index that reads the words in its images (`index --ocr`), else semantic."""
        if mode is not None and mode not in MODES:
            raise InputError(f"mode is one of {', '.join(MODES)} (got {mode!r})")
        words = _words_of(query)
        if mode is None:
            return "hybrid" if words is not None and rerank is None and self.manifest.ocr is not None else "semantic"
        if mode != "semantic" and words is None:
            raise InputError(f"{mode} search matches words: it takes one text query (not an image, an id or a sum)")
        if mode != "semantic" and rerank is not None:
            raise InputError("rerank re-scores the semantic ranking: use it with mode semantic")
        return mode

    def _semantic(
        self,
        snap: OpenSnapshot,
        query: Query,
        k: int,
        target: Kind,
        include_self: bool,
        dedup: float | None,
        hidden: frozenset[int],
        allowed: np.ndarray | None,
        rerank: int | None,
        relevant: bool,
    ) -> tuple[list[Hit], np.ndarray]:
        """The best k by cosine (every one above the relevance cut-off when `relevant`), re-ranked when asked, and
        the query's vector."""
        files = compose.read_query_files(query)  # each query image file read once, to embed it and to recognise it
        reranker = self._reranker_for(query, target) if rerank is not None else None
        # before the embedding, which may wait for a tower still opening (a cold search): looking an image up among the
        # indexed ones imports pyarrow's compute functions (0.07 s), done meanwhile rather than after
        exclude = set() if include_self else compose.own_items(snap.items, query, files)
        vector = self.embed_query(query, files)
        own = len(exclude)
        exclude = exclude | hidden  # not counted in `want`: a large offline drive costs a few doublings, not its size
        threshold = self.relevance_cutoff(vector, target).threshold if relevant else None
        if threshold is not None:
            k = RELEVANT_MAX
        k = max(k, rerank or 0)
        want = k + own if threshold is None else min(k + own, 64)  # relevant: as deep as the scores stay above it
        while True:
            found, exhausted = self._candidates(snap, vector, want, target, allowed)
            kept = [h for h in found if h.id not in exclude]
            if dedup is not None:
                kept = compose.dedup(snap.items, kept, dedup)
            if threshold is not None:
                passed = not found or found[-1].score < threshold  # the last one found is below: all are in
                kept = [h for h in kept if h.score >= threshold]
                if passed or exhausted or want >= k + own:
                    break
            elif len(kept) >= k or exhausted:
                break
            want *= 2  # exclusions and collapsed near-duplicates took places, or the relevant go further down
        if reranker is not None and rerank is not None:
            kept = self._reranked(reranker, query, files, kept[:rerank]) + kept[rerank:]
        return kept, vector

    def _lexical(
        self,
        snap: OpenSnapshot,
        text: str | None,
        target: Kind,
        want: int,
        hidden: frozenset[int],
        allowed: np.ndarray | None,
    ) -> list[Hit]:
        """The best `want` items holding every word of `text` (captions, and words read in images), by BM25."""
        index = self._words(snap)
        limit = max(want, 16)
        while True:
            found = index.match(text or "", target.value, limit)
            keep = np.array([i not in hidden for i in found.ids.tolist()], dtype=bool)
            if allowed is not None and len(found.ids):
                keep &= np.isin(found.ids, allowed)
            if int(keep.sum()) >= want or found.exhausted:
                break
            limit *= 4  # hidden or filtered-out items took places
        ids, scores = found.ids[keep][:want], found.scores[keep][:want]
        return [replace(h, lexical=h.score) for h in opened.hits(snap, scores, ids)]

    def _words(self, snap: OpenSnapshot) -> WordIndex:
        if snap.words is None:
            raise InputError(
                f"{self.dir} was published before clipdex searched by words: run `clipdex index --index {self.dir}` "
                "once to add its full-text index"
            )
        return snap.words

    def _fused(self, snap: OpenSnapshot, semantic: list[Hit], lexical: list[Hit], vector: np.ndarray) -> list[Hit]:
        """The two rankings fused by reciprocal rank (`retrieval.search.fusion`); each hit keeps its cosine (computed
        for those only the words found) and its BM25 (for those the words found)."""
        cosines = {h.id: h.score for h in semantic}
        by_words = {h.id: h for h in lexical}
        only_words = np.array([h.id for h in lexical if h.id not in cosines], dtype=np.int64)
        cosines.update(zip(only_words.tolist(), _exact_scores(snap, only_words, vector).tolist(), strict=True))
        hits = {h.id: h for h in lexical} | {h.id: h for h in semantic}
        fused = reciprocal_rank_fusion([[h.id for h in lexical], [h.id for h in semantic]])  # ties: words first
        return [
            replace(
                hits[i],
                score=score,
                semantic=float(cosines[i]),
                lexical=by_words[i].lexical if i in by_words else None,
            )
            for i, score in fused
        ]

    def relevance_cutoff(self, vector: np.ndarray, target: Kind) -> Cutoff:
        """Where relevance ends for this query vector (`retrieval.search.relevant`): calibrated on its scores over the
        target's items (a seeded sample of a large library) and its best scores."""
        ids = self.ids(target)
        sample = sample_ids(ids)
        scores = _exact_scores(self._snap, sample, vector)
        best = (
            scores
            if len(sample) == len(ids)
            else np.array([h.score for h in self.search_vectors(vector, k=TOP, target=target)[0]])
        )
        return cutoff(scores, best)

    def _sorted(self, snap: OpenSnapshot, hits: list[Hit], sort: str) -> list[Hit]:
        """The hits in the order `sort` asks for (stable: equal keys keep their rank order)."""
        if sort == "score" or not hits:
            return hits
        if sort == "name":
            return sorted(hits, key=lambda h: (Path(h.path).name if h.path else h.text or "").casefold())
        dates = self.dates([h.id for h in hits])
        dated = [(d, replace(h, date=d)) for h in hits if (d := dates.get(h.id)) is not None]
        undated = [h for h in hits if dates.get(h.id) is None]
        ordered = sorted(dated, key=lambda pair: pair[0], reverse=sort == "-date")
        return [h for _, h in ordered] + undated

    def dates(self, ids: list[int]) -> dict[int, float | None]:
        """Each item's date as seconds since the epoch: the photo's capture time, else its file's mtime (None for a
        text without an image)."""
        import pyarrow.compute as pc

        rows = self._rows(self._snap)
        picked = rows.filter(pc.is_in(rows["id"], value_set=integers(np.asarray(ids, dtype=np.int64))))
        taken = picked["taken_at"].to_pylist() if "taken_at" in picked.column_names else [None] * picked.num_rows
        mtime = picked["mtime"].to_pylist()
        out: dict[int, float | None] = {}
        for i, t, m, kind in zip(picked["id"].to_pylist(), taken, mtime, picked["kind"].to_pylist(), strict=True):
            out[int(i)] = t if t is not None else (m if kind == "image" else None)
        return out

    def _reranker_for(self, query: Query, target: Kind) -> Reranker:
        """The index's re-ranking head on its torch model, for a query it can re-score: a text against images, or
        an image against texts (the head scores image-text pairs)."""
        term = query.terms[0] if query.is_plain else None
        by_text = term is not None and term.text is not None and target is Kind.IMAGE
        by_image = term is not None and term.text is None and term.item is None and target is Kind.TEXT
        if not (by_text or by_image):
            raise InputError(
                "--rerank re-scores image-text pairs: it takes a single text query searching images, or a single "
                "query image searching texts"
            )
        from clipdex.retrieval.store.heads import index_head

        snap = self._snap
        head = index_head(self.dir, snap.manifest)
        with self._lock:
            if self._reranker is None or self._reranker[0] != snap.manifest.rerank:
                from clipdex.retrieval.search.rerank import open_reranker

                self._reranker = (head.name, open_reranker(self.dir, head, device=self.device))
            return self._reranker[1]

    def _reranked(self, reranker: Reranker, query: Query, files: compose.QueryFiles, hits: list[Hit]) -> list[Hit]:
        """`hits` ordered by the head's score; those it could not score (a file unreadable now) after the others."""
        if not hits:
            return hits
        term = query.terms[0]
        cosines = np.array([h.score for h in hits], dtype=np.float64)
        if term.text is not None:
            scores = reranker.score_images(term.text, [(h.id, h.path or "") for h in hits], cosines)
        else:
            data = files[term.image][1] if term.image is not None else term.data
            assert data is not None
            scores = reranker.score_texts(data, [h.text or "" for h in hits], cosines)
        scored = [replace(h, rerank=float(s)) for h, s in zip(hits, scores, strict=True) if not np.isnan(s)]
        unscored = [h for h, s in zip(hits, scores, strict=True) if np.isnan(s)]
        return sorted(scored, key=lambda h: -(h.rerank or 0.0)) + unscored

    def answer(self, request: SearchRequest, *, label: str | None = None, option_prefix: str = "--") -> dict[str, Any]:
        """The `results_json` answer to a request: what `clipdex search --json` prints and the HTTP API returns.
        `label` names an uploaded query image; `option_prefix` is how a bad filter value is named (`--after` on the
        command line, `after` in the HTTP API)."""
        query = request.query()
        where = request.filter(option_prefix=option_prefix)
        hits = self.search(
            query,
            k=request.k,
            target=request.target,
            include_self=request.include_self,
            dedup=request.dedup,
            where=where,
            rerank=request.rerank,
            offline=request.offline,
            sort=request.sort,
            relevant=request.relevant,
            mode=request.mode,
        )
        plan = self.filter_plan(where, request.target) if where is not None else None
        mode = self.search_mode(request.mode, query, request.target, request.rerank)
        return results_json(label or query.label(), request.target, hits, query.describe(), plan, mode)

    def similar(self, item_id: int, *, k: int = 10) -> list[Hit]:
        """Items of the same kind nearest to this one's stored vector (image→image, text→text), itself left out."""
        if k < 1:
            raise InputError(f"k must be at least 1 (got {k})")
        return self.search(Query.build(like=item_id), k=k, target=Kind(self.item(item_id).kind))

    # -- filters --------------------------------------------------------------------------------------------------

    def filter_ids(self, where: Filter, target: Kind) -> np.ndarray:
        """Ids of the items of a kind that the filter keeps."""
        from clipdex.retrieval.search.filters import matching_ids

        snap = self._snap
        if snap.items.table is None:
            return np.zeros(0, dtype=np.int64)
        key = (where.where, where.in_folder, where.after, where.before, target)
        found = snap.filtered.get(key)
        if found is None:  # the same filter again (paging, a new query text) costs nothing on the same snapshot
            found = matching_ids(self._rows(snap), where, target.value)
            if len(snap.filtered) >= 32:
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # another thread evicted first
                    snap.filtered.pop(next(iter(snap.filtered)))
            snap.filtered[key] = found
        return found

    def _rows(self, snap: OpenSnapshot) -> Any:
        """Every column of the snapshot's item table (filters, dates), read once per snapshot when first needed."""
        if snap.rows is None:
            snap.rows = read_file(self.dir / snap.manifest.snapshot.files["items"], read_parquet)
        return snap.rows

    def filter_plan(self, where: Filter, target: Kind) -> dict[str, Any]:
        """How a filtered search runs: `matched` items, searched `exact`ly (no more of them than exact search
        covers, or an exact index) or through the `ann` index, deep enough to find k of them."""
        matched = len(self.filter_ids(where, target)) if where.selects else self.count(target)
        return {
            **where.to_json(),
            "matched": matched,
            "indexed": self.count(target),
            "method": "exact" if self._filter_exact(target, matched) else "ann",
        }

    def _filter_exact(self, target: Kind, matched: int) -> bool:
        from clipdex.retrieval import ann

        index = self._snap.indexes.get(target)
        return index is None or matched <= ann.EXACT_MAX or ann.is_exact(index)

    def _candidates(
        self, snap: OpenSnapshot, vector: np.ndarray, want: int, target: Kind, allowed: np.ndarray | None
    ) -> tuple[list[Hit], bool]:
        """The best `want` hits (among `allowed` ids, if given) and whether there are no more to be had."""
        if allowed is None:
            found = self.search_vectors(vector, k=want, target=target)[0]
            return found, len(found) < want
        if not len(allowed):
            return [], True
        if self._filter_exact(target, len(allowed)):
            scores = _exact_scores(snap, allowed, vector)
            order = np.argsort(-scores, kind="stable")[:want]
            return opened.hits(snap, scores[order], allowed[order]), len(order) < want
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


def _stack(pixels: list[Any]) -> Any:
    if isinstance(pixels[0], np.ndarray):  # the numpy preprocessing of the ONNX runtime
        return np.stack(pixels)
    import torch

    return torch.stack(pixels)


def _words_of(query: Query) -> str | None:
    """The text of a query that is one text alone (what lexical search can match), else None."""
    term = query.terms[0] if query.is_plain else None
    return term.text if term is not None and term.text is not None else None


def _exact_scores(snap: OpenSnapshot, ids: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """The cosine of each of `ids`' stored vectors with the query vector (1, d), read 65,536 at a time."""
    chunks = range(0, len(ids), 65536)
    return np.concatenate([snap.items.vectors(ids[i : i + 65536]) @ vector[0] for i in chunks] or [np.empty(0)])
