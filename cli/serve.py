"""The command that serves an index over HTTP: serve."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Annotated, Any

import typer

from clipdex.cli.common import Device, DeviceOpt, IndexDir, RuntimeOpt, app, err, friendly
from clipdex.cli.watch import PollOpt, said, watch_config
from clipdex.retrieval.errors import ClipdexError


@app.command(rich_help_panel="Search")
@friendly
def serve(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    host: Annotated[str, typer.Option(help="Address to listen on; loopback unless you say otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="CLIPDEX_TOKEN",
            help="Require this token on every /api request (Bearer or cookie).",
            show_default=False,
        ),
    ] = None,
    max_upload: Annotated[str, typer.Option(help="Largest query image accepted, e.g. 20M.")] = "20M",
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help="Also answer requests for this host name (repeatable), e.g. when a reverse proxy or another name "
            "reaches the server; others are refused, so no web page can read the index by DNS rebinding.",
        ),
    ] = None,
    device: DeviceOpt = Device.auto,
    runtime: RuntimeOpt = None,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Keep the index current while serving: index the folders it holds whenever files in them change "
            "(as `clipdex watch`); the page shows new results without a reload.",
        ),
    ] = False,
    poll: PollOpt = None,
    ocr: Annotated[
        bool | None,
        typer.Option(
            "--ocr/--no-ocr",
            help="With --watch: read the words in the photos it indexes (as `clipdex index --ocr`, remembered by the "
            "index).",
            show_default="as the index does",
        ),
    ] = None,
) -> None:
    """Serve the index: an HTTP API (OpenAPI at /api/openapi.json) and a web page at /, the model loaded once."""
    from clipdex.retrieval.config import parse_memory
    from clipdex.retrieval.store.manifest import read_manifest

    read_manifest(index_dir)  # a missing or damaged index is said before the model loads
    try:
        upload = parse_memory(max_upload)
    except ValueError as e:
        raise ClipdexError(f"--max-upload: {e}") from None
    if ocr is not None and not watch:
        raise ClipdexError("--ocr/--no-ocr change what indexing reads: use them with --watch, or with clipdex index")
    _check_port_free(host, port)
    watcher = _watcher(index_dir, device, runtime, poll, ocr) if watch else None
    from clipdex.retrieval.serve.app import ServeConfig
    from clipdex.retrieval.serve.app import serve as run_server

    config = ServeConfig(
        index_dir,
        host=host,
        port=port,
        token=token or None,
        device=device.value,
        runtime=runtime.value if runtime else None,
        max_upload_bytes=upload,
        allowed_hosts=tuple(allowed_host or ()),
        watch=watcher.status.to_json if watcher is not None else None,
    )
    if not config.is_loopback and not config.token:
        err.print(
            f"[bold yellow]warning:[/] listening on {host} without --token: anyone who can reach this machine can "
            "search the index and see its images",
            highlight=False,
        )
    if watcher is not None:
        watcher.start()
    try:
        run_server(config, on_ready=lambda searcher: _ready(searcher, config))
    finally:
        if watcher is not None:
            watcher.stop.set()
        failed = sys.exc_info()[0]
        leave_stuck_threads(0 if failed is None else 130 if issubclass(failed, KeyboardInterrupt) else 1)


def leave_stuck_threads(code: int, wait_s: float = 2.0) -> None:
    """Exit now with `code` if a thread is still running once the server has stopped: Python joins every worker
    thread at exit, and one blocked in the kernel (a read from a stalled network share) would keep a stopped server
    alive for good, deaf to SIGTERM and Ctrl-C. Returns when none is."""
    deadline = time.monotonic() + wait_s
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _watcher(index_dir: Any, device: Device, runtime: Any, poll: bool | None, ocr: bool | None = None) -> Any:
    """The watcher `--watch` runs beside the server, over the folders the index holds, saying each run in a line."""
    from clipdex.indexer.watch import Watcher

    config = watch_config(
        index_dir, None, device=device.value, runtime=runtime.value if runtime else None, poll=poll, ocr=ocr
    )
    return Watcher(config, on_run=lambda summary, seconds: said(summary, seconds, as_json=False))


def _ready(searcher: Any, config: Any) -> None:
    counts = searcher.manifest.counts
    shown = f"[{config.host}]" if ":" in config.host else config.host
    err.print(
        f"clipdex: serving {config.index_dir} ({counts.get('images', 0)} images, {counts.get('texts', 0)} texts) at "
        f"http://{shown}:{config.port}/  (Ctrl-C to stop)",
        highlight=False,
        soft_wrap=True,
    )


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ClipdexError(
                f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host"
            ) from None
