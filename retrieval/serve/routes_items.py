"""`/api/items/{id}`: an item, items like it, and an image item's thumbnail and file. Files are reachable only as
indexed items, by id; no route takes a path."""

from __future__ import annotations

import functools
import os

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse

from clipdex.retrieval.config import Kind
from clipdex.retrieval.errors import ItemNotFoundError
from clipdex.retrieval.search.hits import results_json
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.deps import ServeConfig, check_k, in_file_pool, item_id, searcher, settings
from clipdex.retrieval.serve.schemas import ItemModel, JSONAsPrinted, SearchResponse
from clipdex.retrieval.serve.thumbnails import iter_file, open_item_file, thumbnail

router = APIRouter(prefix="/api/items", tags=["items"])


@router.get("/{item}", response_model=ItemModel)
def get_item(item: str, s: Searcher = Depends(searcher)) -> JSONAsPrinted:
    return JSONAsPrinted(s.item(item_id(item)).to_json())


@router.get("/{item}/similar", response_model=SearchResponse)
def similar(
    item: str,
    k: int = Query(10, description="Number of results."),
    s: Searcher = Depends(searcher),
    config: ServeConfig = Depends(settings),
) -> JSONAsPrinted:
    i = item_id(item)
    target = Kind(s.item(i).kind)
    return JSONAsPrinted(results_json(f"similar:{i}", target, s.similar(i, k=check_k(k, config))))


@router.get("/{item}/thumbnail", response_class=Response)
async def get_thumbnail(
    item: str, request: Request, s: Searcher = Depends(searcher), config: ServeConfig = Depends(settings)
) -> Response:
    path = _image_path(s, item_id(item))
    made = functools.partial(thumbnail, path, cache=request.app.state.thumbnails, size=config.thumbnail_size)
    data, etag = await in_file_pool(request, made)
    headers = {"ETag": f'"{etag}"', "Cache-Control": "private, max-age=86400"}
    if _etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/jpeg", headers=headers)


@router.get("/{item}/image", response_class=Response)
async def get_image(item: str, request: Request, s: Searcher = Depends(searcher)) -> Response:
    path = _image_path(s, item_id(item))
    info, fd = await in_file_pool(request, open_item_file, path)
    headers = {
        "ETag": f'"{info.etag}"',
        "Cache-Control": "private, max-age=3600",
        "X-Content-Type-Options": "nosniff",
    }
    if _etag_matches(request, info.etag):
        os.close(fd)
        return Response(status_code=304, headers=headers)
    headers["Content-Length"] = str(info.size)
    return StreamingResponse(iter_file(fd, info.size), media_type=info.media_type, headers=headers)


def _image_path(s: Searcher, item: int) -> str:
    found = s.item(item)
    if found.kind != Kind.IMAGE.value or not found.path:
        raise ItemNotFoundError(f"item {item} is a text, not an image")
    return found.path


def _etag_matches(request: Request, etag: str) -> bool:
    return f'"{etag}"' in request.headers.get("if-none-match", "")
