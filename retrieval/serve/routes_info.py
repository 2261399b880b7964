"""The server itself: `/healthz`, `/api/info` (what the index holds, and this server's limits), `/api/status` (what
changes while it runs), and the web page's files (nothing is loaded from elsewhere)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.deps import ServeConfig, searcher, settings

router = APIRouter(tags=["server"])

PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


@router.get("/healthz")
def healthz(s: Searcher = Depends(searcher)) -> dict[str, Any]:
    return {"status": "ok", "generation": s.manifest.snapshot.generation}


@router.get("/api/info")
def info(s: Searcher = Depends(searcher), config: ServeConfig = Depends(settings)) -> dict[str, Any]:
    from clipdex.retrieval.maintain.info import index_info

    data = index_info(config.index_dir)
    data["limits"] = {
        "k": config.max_k,
        "query_chars": config.max_query_chars,
        "upload_bytes": config.max_upload_bytes,
    }
    if config.watch is not None:
        data["watch"] = config.watch()
    return data


@router.get("/api/status")
def status(s: Searcher = Depends(searcher), config: ServeConfig = Depends(settings)) -> dict[str, Any]:
    """What changes while the server runs, cheap enough to ask every few seconds: the snapshot searched (a newer
    generation means new results), its counts, and under `serve --watch` whether indexing is under way."""
    return {
        "generation": s.manifest.snapshot.generation,
        "counts": s.manifest.counts,
        "watch": config.watch() if config.watch is not None else None,
    }


def _page_file(name: str, media_type: str) -> Any:
    data = resources.files("clipdex.retrieval.serve").joinpath("web", name).read_bytes()

    def endpoint() -> Response:
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return endpoint


page = APIRouter(include_in_schema=False)
for _route, (_name, _media_type) in PAGE_FILES.items():
    page.add_api_route(_route, _page_file(_name, _media_type), methods=["GET"])
