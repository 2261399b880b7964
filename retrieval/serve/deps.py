"""What routes are handed (FastAPI `Depends`): the settings, the one `Searcher` (refreshed per request), and small
checks every route shares."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request

from clipdex.retrieval.errors import FileTimeoutError, InputError, ItemNotFoundError
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.guard import is_loopback
from clipdex.retrieval.serve.thumbnails import THUMBNAIL_SIZE

_ID = re.compile(r"[0-9]{1,18}")
T = TypeVar("T")


@dataclass(frozen=True)
class ServeConfig:
    index_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    device: str = "auto"
    runtime: str | None = None  # auto, onnx or torch (retrieval.model.runtime)
    max_upload_bytes: int = 20 << 20
    max_query_chars: int = 1000
    max_k: int = 1000
    thumbnail_size: int = THUMBNAIL_SIZE
    allowed_hosts: tuple[str, ...] = ()  # names besides loopback ones (or the bound address) that requests may use
    watch: Callable[[], dict[str, Any]] | None = None  # `serve --watch`: what the watcher is doing now

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)


def settings(request: Request) -> ServeConfig:
    return request.app.state.config


def searcher(request: Request) -> Searcher:
    """The app's searcher; a publish by a running `clipdex index` is picked up at the next request."""
    s: Searcher = request.app.state.searcher
    s.refresh()
    return s


FILE_READS_AT_ONCE = 8  # threads reading item files; more requests wait (within the timeout)
FILE_TIMEOUT_S = 10.0


async def in_file_pool(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on one of the server's file-reading threads, given up after FILE_TIMEOUT_S (waiting included): a
    read that hangs in the kernel (a stalled network share) holds one thread, never the server."""
    import anyio.to_thread

    try:
        with anyio.fail_after(FILE_TIMEOUT_S):
            return await anyio.to_thread.run_sync(
                functools.partial(fn, *args), limiter=request.app.state.file_reads, abandon_on_cancel=True
            )
    except TimeoutError:
        raise FileTimeoutError(f"reading the file took over {FILE_TIMEOUT_S:g} s; try again later") from None


def check_k(k: int, config: ServeConfig) -> int:
    if not 1 <= k <= config.max_k:
        raise InputError(f"k must be between 1 and {config.max_k} (got {k})")
    return k


def item_id(text: str) -> int:
    if not _ID.fullmatch(text):
        raise ItemNotFoundError(f"no item with id {text!r}")
    return int(text)
