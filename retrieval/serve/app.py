"""`clipdex serve`: an HTTP API and a web page over one `Searcher`, in one process, the model loaded once.

A thin layer like the CLI: every answer comes from `Searcher` (search JSON is `results_json`, byte for byte what
`clipdex search --json` prints); this module only parses requests, enforces limits and the token, and maps
`ClipdexError` subclasses to 4xx JSON in one place. Files are reachable only as indexed items, by id
(`retrieval.thumbnails`); no route takes a path.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipdex.retrieval.errors import ClipdexError, IndexFormatError, IndexNotFoundError, InputError, ItemNotFoundError
from clipdex.retrieval.search.filters import Filter
from clipdex.retrieval.search.query import Query as QueryTerms
from clipdex.retrieval.search.searcher import Searcher, Target, results_json
from clipdex.retrieval.serve.thumbnails import (
    THUMBNAIL_SIZE,
    FileGoneError,
    iter_file,
    open_item_file,
    thumbnail,
    thumbnail_dir,
)

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "clipdex_token"
_ID = re.compile(r"[0-9]{1,18}")
_PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


@dataclass(frozen=True)
class ServeConfig:
    index_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    device: str = "auto"
    max_upload_bytes: int = 20 << 20
    max_query_chars: int = 1000
    max_k: int = 1000
    thumbnail_size: int = THUMBNAIL_SIZE

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK or self.host.startswith("127.")


class HitModel(BaseModel):
    rank: int
    score: float
    id: int
    kind: Literal["image", "text"]
    path: str | None
    text: str | None


class TermModel(BaseModel):
    weight: float
    text: str | None = None
    image: str | None = None
    like: int | None = None


class SearchResponse(BaseModel):
    query: str
    target: Literal["images", "texts"]
    terms: list[TermModel] | None = None
    results: list[HitModel]


class ItemModel(BaseModel):
    id: int
    kind: Literal["image", "text"]
    path: str | None
    text: str | None


class SearchBody(BaseModel):
    q: str | None = None
    like: int | None = None
    add: list[str] = []
    subtract: list[str] = []
    k: int = 10
    target: Literal["images", "texts"] = "images"
    include_self: bool = False
    dedup: float | None = None
    in_folder: str | None = Field(None, alias="in")
    after: str | None = None
    before: str | None = None
    min_score: float | None = None

    model_config = {"populate_by_name": True}


class ErrorModel(BaseModel):
    error: str


class _JSON(Response):
    """JSON as the CLI prints it (json.dumps, no ASCII escaping), so both give the same bytes."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False).encode("utf-8")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _status_for(e: ClipdexError) -> int:
    if isinstance(e, ItemNotFoundError | FileGoneError):
        return 404
    if isinstance(e, _TooLarge):
        return 413
    if isinstance(e, IndexFormatError | IndexNotFoundError):
        return 503  # the index, not the request, is at fault: `clipdex check` says more
    return 400


_MAX_IMAGE_TERMS = 4  # add_image and subtract_image files in one search, each


def create_app(searcher: Searcher, config: ServeConfig) -> FastAPI:
    """The ASGI app over one searcher; `serve` runs it on uvicorn, tests call it directly."""
    app = FastAPI(
        title="clipdex",
        summary="Search an index of images and texts with words or pictures.",
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; the schema alone is served
        redoc_url=None,
        openapi_url="/api/openapi.json",
        responses={400: {"model": ErrorModel}, 401: {"model": ErrorModel}, 404: {"model": ErrorModel}},
    )
    cache = thumbnail_dir(config.index_dir)

    def current() -> Searcher:
        searcher.refresh()  # a publish by a running `clipdex index` is picked up at the next request
        return searcher

    def check_k(k: int) -> int:
        if not 1 <= k <= config.max_k:
            raise InputError(f"k must be between 1 and {config.max_k} (got {k})")
        return k

    def item_id(text: str) -> int:
        if not _ID.fullmatch(text):
            raise ItemNotFoundError(f"no item with id {text!r}")
        return int(text)

    @app.exception_handler(ClipdexError)
    async def _clipdex_error(request: Request, e: ClipdexError) -> JSONResponse:
        return _error(_status_for(e), str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error ({type(e).__name__}); the server log has details")

    @app.middleware("http")
    async def _token(request: Request, call_next: Any) -> Any:
        if config.token and request.url.path.startswith("/api/") and not _has_token(request, config.token):
            return _error(401, "this server needs a token: send `Authorization: Bearer TOKEN`")
        return await call_next(request)

    @app.get("/healthz", tags=["server"])
    def healthz() -> dict[str, Any]:
        s = current()
        return {"status": "ok", "generation": s.manifest.snapshot.generation}

    @app.get("/api/info", tags=["server"])
    def info() -> dict[str, Any]:
        from clipdex.retrieval.maintain.info import index_info

        current()
        data = index_info(config.index_dir)
        data["limits"] = {
            "k": config.max_k,
            "query_chars": config.max_query_chars,
            "upload_bytes": config.max_upload_bytes,
        }
        return data

    def answer(
        s: Searcher,
        body: SearchBody,
        *,
        data: bytes | None = None,
        filename: str | None = None,
        images: dict[str, list[bytes]] | None = None,
    ) -> dict[str, Any]:
        for text in [body.q or "", *body.add, *body.subtract]:
            if len(text) > config.max_query_chars:
                raise InputError(f"a query text is {len(text)} characters long; the limit is {config.max_query_chars}")
        # Query.build refuses empty texts, as the CLI does
        extra = images or {}
        query = QueryTerms.build(
            text=body.q,
            data=data,
            like=body.like,
            add=body.add,
            subtract=body.subtract,
            add_data=extra.get("add_image", []),
            subtract_data=extra.get("subtract_image", []),
        )
        tgt = Target(body.target)
        where = Filter.build(
            in_folder=Path(body.in_folder) if body.in_folder else None,
            after=body.after,
            before=body.before,
            min_score=body.min_score,
            option_prefix="",
        )
        hits = s.search(
            query, k=check_k(body.k), target=tgt, include_self=body.include_self, dedup=body.dedup, where=where
        )
        label = filename or "upload" if data is not None and body.q is None and body.like is None else query.label()
        plan = s.filter_plan(where, tgt) if where is not None else None
        return results_json(label, tgt, hits, query.describe(), plan)

    @app.get("/api/search", response_model=SearchResponse, tags=["search"])
    def search_get(
        q: str | None = Query(None, description="Text query (`2:text` weighs it 2)."),
        like: int | None = Query(None, description="An indexed item's id, to search by its vector."),
        add: list[str] = Query([], description="Texts added to the query (repeatable)."),
        subtract: list[str] = Query([], description="Texts subtracted from the query (repeatable)."),
        k: int = Query(10, description="Number of results."),
        target: Literal["images", "texts"] = Query("images", description="Search images or texts."),
        include_self: bool = Query(
            False,
            description="Keep the indexed items the query is made of (a `like` item, an uploaded image's indexed copies); "
            "by default they are left out.",
        ),
        dedup: float | None = Query(None, description="Leave out results this close (cosine) to a better one."),
        in_folder: str | None = Query(None, alias="in", description="Only items at or under this folder."),
        after: str | None = Query(None, description="Only photos taken (else modified) on or after this date."),
        before: str | None = Query(None, description="Only photos taken (else modified) before this date."),
        min_score: float | None = Query(None, description="Only results scoring at least this cosine."),
    ) -> _JSON:
        body = SearchBody(  # type: ignore[call-arg]  # `in` by its field name (populate_by_name)
            in_folder=in_folder,
            after=after,
            before=before,
            min_score=min_score,
            q=q,
            like=like,
            add=add,
            subtract=subtract,
            k=k,
            target=target,
            include_self=include_self,
            dedup=dedup,
        )
        return _JSON(answer(current(), body))

    @app.post(
        "/api/search",
        response_model=SearchResponse,
        tags=["search"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": SearchBody.model_json_schema()},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                "add_image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                                "subtract_image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                                "q": {"type": "string"},
                                "like": {"type": "integer"},
                                "add": {"type": "array", "items": {"type": "string"}},
                                "subtract": {"type": "array", "items": {"type": "string"}},
                                "k": {"type": "integer", "default": 10},
                                "target": {"type": "string", "enum": ["images", "texts"], "default": "images"},
                                "include_self": {"type": "boolean"},
                                "dedup": {"type": "number"},
                                "in": {"type": "string"},
                                "after": {"type": "string"},
                                "before": {"type": "string"},
                                "min_score": {"type": "number"},
                            },
                        }
                    },
                },
            }
        },
    )
    async def search_post(request: Request) -> _JSON:
        """Search by an uploaded image (multipart field `image`; image→image by default) or by text (JSON `q`)."""
        s = current()
        raw = await _read_limited(request, config.max_upload_bytes + (64 << 10))
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                body = SearchBody.model_validate_json(raw)
            except ValueError as e:
                raise InputError(
                    f"the JSON body must be {{'q': TEXT, 'k': N, 'target': 'images'|'texts', ...}} ({_first_line(e)})"
                ) from None
            return _JSON(await run_in_threadpool(answer, s, body))
        if kind != "multipart/form-data":
            raise InputError("send multipart/form-data with an `image` file, or application/json with `q`")
        form = await _replay(request, raw).form(max_files=1 + 2 * _MAX_IMAGE_TERMS, max_fields=64)
        texts = {name: [v for v in form.getlist(name) if isinstance(v, str)] for name in ("add", "subtract")}
        q, like = form.get("q"), form.get("like")
        body = SearchBody(  # type: ignore[call-arg]  # `in` by its field name (populate_by_name)
            q=q if isinstance(q, str) else None,
            like=_form_int(like, None, "like") if like is not None else None,
            add=texts["add"],
            subtract=texts["subtract"],
            k=_form_int(form.get("k"), 10, "k"),
            target=_form_target(form.get("target")).value,
            include_self=bool(_form_bool(form.get("include_self"))),
            dedup=_form_float(form.get("dedup")),
            in_folder=_form_str(form.get("in")),
            after=_form_str(form.get("after")),
            before=_form_str(form.get("before")),
            min_score=_form_float(form.get("min_score")),
        )
        images: dict[str, list[bytes]] = {}
        for field in ("add_image", "subtract_image"):
            files = [f for f in form.getlist(field) if not isinstance(f, str)]
            if len(files) > _MAX_IMAGE_TERMS:
                raise InputError(f"at most {_MAX_IMAGE_TERMS} `{field}` files")
            images[field] = [await f.read() for f in files]  # the whole body is within the upload limit
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            if body.q is None and body.like is None:
                raise InputError("the form needs an `image` file (or a `q` text)")
            return _JSON(await run_in_threadpool(answer, s, body, images=images))
        data = await upload.read()
        if len(data) > config.max_upload_bytes:
            raise _TooLarge(config.max_upload_bytes)
        return _JSON(await run_in_threadpool(answer, s, body, data=data, filename=upload.filename, images=images))

    @app.get("/api/items/{item}", response_model=ItemModel, tags=["items"])
    def get_item(item: str) -> _JSON:
        return _JSON(current().item(item_id(item)).to_json())

    @app.get("/api/items/{item}/similar", response_model=SearchResponse, tags=["items"])
    def similar(item: str, k: int = Query(10, description="Number of results.")) -> _JSON:
        s, i = current(), item_id(item)
        found = s.item(i)
        tgt = Target.IMAGES if found.kind == "image" else Target.TEXTS
        return _JSON(results_json(f"similar:{i}", tgt, s.similar(i, k=check_k(k))))

    @app.get("/api/items/{item}/thumbnail", tags=["items"], response_class=Response)
    def get_thumbnail(item: str, request: Request) -> Response:
        path = _image_path(current(), item_id(item))
        data, etag = thumbnail(path, cache=cache, size=config.thumbnail_size)
        headers = {"ETag": f'"{etag}"', "Cache-Control": "private, max-age=86400"}
        if _etag_matches(request, etag):
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/api/items/{item}/image", tags=["items"], response_class=Response)
    def get_image(item: str, request: Request) -> Response:
        path = _image_path(current(), item_id(item))
        info, fd = open_item_file(path)
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

    for route, (name, media_type) in _PAGE_FILES.items():
        app.add_api_route(route, _page_file(name, media_type), methods=["GET"], include_in_schema=False)
    return app


class _TooLarge(ClipdexError):
    def __init__(self, limit: int):
        super().__init__(f"the upload is over the limit of {limit} bytes")


def _page_file(name: str, media_type: str) -> Any:
    data = resources.files("clipdex.retrieval.serve").joinpath("web", name).read_bytes()

    def endpoint() -> Response:
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return endpoint


def _image_path(searcher: Searcher, item: int) -> str:
    found = searcher.item(item)
    if found.kind != "image" or not found.path:
        raise ItemNotFoundError(f"item {item} is a text, not an image")
    return found.path


def _has_token(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    candidates = [given[7:] if given.lower().startswith("bearer ") else "", request.cookies.get(TOKEN_COOKIE, "")]
    return any(c and hmac.compare_digest(c.encode(), token.encode()) for c in candidates)


def _etag_matches(request: Request, etag: str) -> bool:
    return f'"{etag}"' in request.headers.get("if-none-match", "")


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:  # chunked uploads declare no length: count as they come
            raise _TooLarge(limit)
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


def _form_int(value: Any, default: Any, name: str) -> Any:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or not re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
        raise InputError(f"{name} must be a whole number (got {value!r})")
    return int(value)


def _form_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _form_bool(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise InputError(f"include_self must be true or false (got {value!r})")
    return value.strip().lower() in ("true", "1", "yes")


def _form_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value) if isinstance(value, str) else float("nan")
    except ValueError:
        raise InputError(f"dedup must be a number (got {value!r})") from None


def _form_target(value: Any) -> Target:
    if value is None or value == "":
        return Target.IMAGES
    try:
        return Target(value)
    except ValueError:
        raise InputError(f"target must be images or texts (got {value!r})") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _when_started(server: Any, callback: Any) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.02)
    if server.started:
        callback()


def serve(config: ServeConfig, *, on_ready: Any = None) -> None:
    """Open the index, load its model once, and answer on `config.host:config.port` until interrupted."""
    import uvicorn

    from clipdex.retrieval.serve import remote

    searcher = Searcher(config.index_dir, device=config.device)
    _ = searcher.encoder  # load the model before the first request, not during it
    app = create_app(searcher, config)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    )
    registered = None
    if config.is_loopback:  # `clipdex search` on this machine may ask this server instead of loading the model
        host = f"[{config.host}]" if ":" in config.host else config.host
        registered = remote.register(config.index_dir, f"http://{host}:{config.port}", config.token)
    if on_ready is not None:  # said once the socket is bound: a client told "serving" can connect at once
        threading.Thread(target=_when_started, args=(server, lambda: on_ready(searcher)), daemon=True).start()
    try:
        server.run()
    finally:
        if registered is not None:
            remote.unregister(registered)
