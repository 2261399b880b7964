"""What a query is made of, among the indexed items: the image files it names (read once), the indexed items it
is (left out of its own results unless asked), and near-copies among its hits (collapsed by `dedup`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipdex.retrieval.config import Kind
from clipdex.retrieval.imaging.decode import read_query_image
from clipdex.retrieval.paths import canonical, content_hash
from clipdex.retrieval.search.hits import Hit
from clipdex.retrieval.search.query import Query
from clipdex.retrieval.store.columns import among
from clipdex.retrieval.store.reader import PublishedItems

QueryFiles = dict[Path, tuple[Path, bytes]]  # an image file as the query names it → (its canonical path, its bytes)


def read_query_files(query: Query) -> QueryFiles:
    """Each image file a query names, read once: to embed it and to recognise it among the indexed images."""
    files = {}
    for t in query.terms:
        if t.image is not None and t.image not in files:
            path = canonical(t.image)
            files[t.image] = (path, read_query_image(path))
    return files


def own_items(items: PublishedItems, query: Query, files: QueryFiles) -> set[int]:
    """Indexed items a query is made of: `like` ids, and the images a positive query image is, by path or content."""
    own = {t.item for t in query.terms if t.item is not None and t.weight > 0}
    table = items.table
    if table is None:
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
    if not paths and not hashes:  # a text or an id: nothing to look for
        return own
    same = among(table["path"], paths)  # a null is not the same
    if hashes and "hash" in table.column_names:
        same |= among(table["hash"], hashes)
    mine = same[items.at] & items.kinds[Kind.IMAGE.value]  # searchable images
    own.update(int(i) for i in items.ids[mine])
    return own


def dedup(items: PublishedItems, hits: list[Hit], threshold: float) -> list[Hit]:
    """Best first, keep a hit unless its cosine with a hit already kept reaches `threshold`."""
    if len(hits) < 2:
        return hits
    vectors = items.vectors(np.array([h.id for h in hits], dtype=np.int64))
    kept: list[int] = []
    for i in range(len(hits)):
        if not kept or float(np.max(vectors[kept] @ vectors[i])) < threshold:
            kept.append(i)
    return [hits[i] for i in kept]
