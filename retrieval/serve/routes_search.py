"""`/api/search`: GET with a query string, POST with a JSON body or a multipart form with image files. All three
parse into one `SearchRequest` and are answered by `Searcher.answer`, byte for byte what `clipdex search --json`
prints."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from clipdex.retrieval.errors import InputError, UploadTooLargeError
from clipdex.retrieval.search.request import MAX_IMAGE_TERMS, SearchRequest, openapi_body, openapi_parameters, params
from clipdex.retrieval.search.request import Wire as _Wire
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.deps import ServeConfig, searcher, settings
from clipdex.retrieval.serve.schemas import JSONAsPrinted, SearchResponse

router = APIRouter(prefix="/api", tags=["search"])

_FILE_FIELDS = tuple(f.name for f in params(_Wire.FILE))


@router.get("/search", response_model=SearchResponse, openapi_extra={"parameters": openapi_parameters()})
def search_get(
    request: Request, s: Searcher = Depends(searcher), config: ServeConfig = Depends(settings)
) -> JSONAsPrinted:
    """Search by text (`q`), by an indexed item (`like`), or both, with the refinements below."""
    asked = SearchRequest.from_fields(request.query_params.getlist)
    return JSONAsPrinted(_answer(s, asked, config))


@router.post("/search", response_model=SearchResponse, openapi_extra={"requestBody": openapi_body()})
async def search_post(
    request: Request, s: Searcher = Depends(searcher), config: ServeConfig = Depends(settings)
) -> JSONAsPrinted:
    """Search by an uploaded image (multipart field `image`; image→image by default) or by text (JSON `q`)."""
    raw = await read_limited(request, config.max_upload_bytes + (64 << 10))
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json":
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise InputError(
                f"the JSON body must be {{'q': TEXT, 'k': N, 'target': 'images'|'texts', ...}} ({_first_line(e)})"
            ) from None
        asked = SearchRequest.from_json(body)
        return JSONAsPrinted(await run_in_threadpool(_answer, s, asked, config))
    if media != "multipart/form-data":
        raise InputError("send multipart/form-data with an `image` file, or application/json with `q`")
    asked, label = await _from_form(request, raw, config)
    return JSONAsPrinted(await run_in_threadpool(_answer, s, asked, config, label))


async def _from_form(request: Request, raw: bytes, config: ServeConfig) -> tuple[SearchRequest, str | None]:
    """The request a form makes, and the name of its query image when the image is the whole query."""
    form = await _replay(request, raw).form(max_files=1 + 2 * MAX_IMAGE_TERMS, max_fields=64)
    texts = lambda name: [v for v in form.getlist(name) if isinstance(v, str)]  # noqa: E731
    uploads: dict[str, list[UploadFile]] = {
        name: [f for f in form.getlist(name) if isinstance(f, UploadFile)] for name in _FILE_FIELDS
    }
    data = {name: [await f.read() for f in files] for name, files in uploads.items() if files}
    if data.get("image") and len(data["image"][0]) > config.max_upload_bytes:
        raise UploadTooLargeError(config.max_upload_bytes)
    asked = SearchRequest.from_fields(texts, data)
    if asked.image is None and asked.q is None and asked.like is None:
        raise InputError("the form needs an `image` file (or a `q` text)")
    alone = asked.image is not None and asked.q is None and asked.like is None
    return asked, (uploads["image"][0].filename or "upload") if alone else None


def _answer(s: Searcher, asked: SearchRequest, config: ServeConfig, label: str | None = None) -> dict[str, Any]:
    asked.check_limits(max_k=config.max_k, max_chars=config.max_query_chars)
    return s.answer(asked, label=label, option_prefix="")


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise UploadTooLargeError(limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:  # chunked uploads declare no length: count as they come
            raise UploadTooLargeError(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(request: Request, body: bytes) -> Request:
    """A request whose body is the bytes already read (so the form parser sees a body within the limit)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
