"""`clipdex serve`: an HTTP API and a web page over one `Searcher`, in one process, the model loaded once.

A thin layer like the CLI: routers by area (`routes_search`, `routes_items`, `routes_info`) get the searcher and
the settings by dependency (`deps`), every answer comes from `Searcher`, and `ClipdexError`s become JSON 4xx in one
handler, with the status each error class declares. This module assembles the app and runs it.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipdex.retrieval.errors import ClipdexError, disk_error
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve import routes_info, routes_items, routes_search
from clipdex.retrieval.serve.deps import FILE_READS_AT_ONCE, ServeConfig
from clipdex.retrieval.serve.guard import HostGuard
from clipdex.retrieval.serve.schemas import ErrorModel, error_response
from clipdex.retrieval.serve.thumbnails import thumbnail_dir
from clipdex.retrieval.signals import term_as_interrupt

log = logging.getLogger(__name__)

GRACEFUL_S = 3  # seconds a stopping server lets running requests finish

TOKEN_COOKIE = "clipdex_token"
__all__ = ["TOKEN_COOKIE", "ServeConfig", "create_app", "serve"]


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
    app.state.searcher = searcher
    app.state.config = config
    app.state.thumbnails = thumbnail_dir(config.index_dir)
    app.state.file_reads = anyio.CapacityLimiter(FILE_READS_AT_ONCE)
    _add_error_handlers(app)
    _add_token_check(app, config.token)
    app.add_middleware(HostGuard, bind=config.host, port=config.port, allowed=config.allowed_hosts)  # outermost
    for router in (routes_info.router, routes_search.router, routes_items.router, routes_info.page):
        app.include_router(router)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClipdexError)
    async def _clipdex_error(request: Request, e: ClipdexError) -> JSONResponse:
        return error_response(e.http_status, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error_response(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        said = disk_error(e)  # a full or failing disk under a route: said, not a 500
        if said is not None:
            return error_response(said.http_status, str(said))
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error ({type(e).__name__}); the server log has details")


def _add_token_check(app: FastAPI, token: str | None) -> None:
    if not token:  # nothing to check: no middleware (an HTTP middleware costs each request about half a ms)
        return

    @app.middleware("http")
    async def _token(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/api/") and not _has_token(request, token):
            return error_response(401, "this server needs a token: send `Authorization: Bearer TOKEN`")
        return await call_next(request)


def _has_token(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    candidates = [given[7:] if given.lower().startswith("bearer ") else "", request.cookies.get(TOKEN_COOKIE, "")]
    return any(c and hmac.compare_digest(c.encode(), token.encode()) for c in candidates)


def _when_started(server: Any, callback: Any) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.02)
    if server.started:
        callback()


def serve(config: ServeConfig, *, on_ready: Any = None) -> None:
    """Open the index, load its model once, and answer on `config.host:config.port` until interrupted."""
    import uvicorn

    from clipdex.retrieval.serve import remote
    from clipdex.retrieval.serve.timeouts import TimedHttpProtocol

    searcher = Searcher(config.index_dir, device=config.device, runtime=config.runtime)
    _ = searcher.encoder  # load the model before the first request, not during it
    app = create_app(searcher, config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            http=TimedHttpProtocol,
            timeout_graceful_shutdown=GRACEFUL_S,  # requests still running then are cancelled: SIGTERM always ends it
        )
    )
    registered = None
    if config.is_loopback:  # `clipdex search` on this machine may ask this server instead of loading the model
        host = f"[{config.host}]" if ":" in config.host else config.host
        registered = remote.register(config.index_dir, f"http://{host}:{config.port}", config.token)
    if on_ready is not None:  # said once the socket is bound: a client told "serving" can connect at once
        threading.Thread(target=_when_started, args=(server, lambda: on_ready(searcher)), daemon=True).start()
    with term_as_interrupt():  # uvicorn catches SIGTERM while it serves, then raises it again under our handler
        try:
            server.run()
        finally:
            if registered is not None:
                remote.unregister(registered)
