"""What a search answers: hits, items, and the one JSON shape of an answer (the CLI's `--json`, the HTTP API's body)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from clipdex.retrieval.config import Kind


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
    rerank: float | None = None  # the re-ranking head's score (`--rerank`), for the hits it re-scored
    offline: bool = False  # on a drive or folder that could not be read at the last run (`--offline show`)
    date: float | None = None  # sorted by date: the capture time, else the file's mtime (seconds since the epoch)
    ocr: str | None = None  # the words read in the image (`index --ocr`)
    semantic: float | None = None  # hybrid search: the cosine, which `score` fused with BM25
    lexical: float | None = None  # lexical and hybrid search: the BM25 of the words matched (None: not matched)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("rerank", "date", "semantic", "lexical"):
            if out[name] is None:
                del out[name]
        if not self.ocr:
            del out["ocr"]
        if not self.offline:
            del out["offline"]
        return out


def hits_from_rows(scores: Any, ids: Any, rows: list[dict[str, Any]]) -> list[Hit]:
    return [
        Hit(
            rank=r + 1,
            score=float(s),
            id=int(i),
            kind=row["kind"],
            path=row["path"],
            text=row["text"],
            ocr=row.get("ocr"),
        )
        for r, (s, i, row) in enumerate(zip(scores, ids, rows, strict=True))
    ]


def results_json(
    query: str,
    target: Kind,
    hits: list[Hit],
    terms: list[dict[str, Any]] | None = None,
    filter: dict[str, Any] | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """The one shape of a search answer: `clipdex search --json` prints it, the HTTP API returns it. `terms` lists
        a composed query's parts (`Query.describe`), `filter` how a filter was applied (`Searcher.filter_plan`), `mode`
    how the results were ranked (semantic, lexical or hybrid)."""
    out: dict[str, Any] = {"query": query, "target": target.plural}
    if mode is not None:
        out["mode"] = mode
    if terms is not None:
        out["terms"] = terms
    if filter is not None:
        out["filter"] = filter
    out["results"] = [h.to_json() for h in hits]
    return out
