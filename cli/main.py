"""The `clipdex` command. Each subcommand builds a typed config and calls one library function.

The commands live by subject in cli/library.py, cli/watch.py, cli/query.py, cli/serve.py and cli/models.py; importing
them registers them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from typing import Annotated, NoReturn

import typer

from clipdex.cli import library, models, query, serve, watch  # noqa: F401 (registers the commands)
from clipdex.cli.common import app, version_callback

__all__ = ["app", "main", "run"]


def _setup_logging() -> None:
    # Our own warnings reach the user; third-party chatter (open_clip logs download retries and
    # failures on the root logger) would break the one-line error rule, and our message says it all.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("clipdex: %(message)s"))
    for name in ("clipdex",):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger().setLevel(logging.CRITICAL)


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Cross-modal image–text search: index photos and captions with CLIP, search them in milliseconds."""


def main() -> None:
    _setup_logging()
    # clipdex applies its own pixel limit (--max-pixels) before decoding; PIL's warning below its own would be noise
    warnings.filterwarnings("ignore", message=".*could be decompression bomb DOS attack")
    with contextlib.suppress(Exception):  # only a head start: the command itself says what is wrong
        query.warm_early(sys.argv[1:])
    app()


# Commands that only read and print. Once a search has printed and every thread it started has ended, the process
# ends without the interpreter's teardown: ONNX Runtime's sessions, FAISS's indexes and some 600 modules freed one by
# one, which took 0.1 s of a cold search (0.87 s against 0.75 s, medians of 8 pairs), memory the system frees at once.
_READ_ONLY = frozenset({"search"})


def run() -> None:
    """The `clipdex` program (its console script and `python -m clipdex`): `main`, then a quick exit after a search.
    `main` itself returns as any function does, for whoever calls it in a process that goes on."""
    try:
        main()
    except SystemExit as e:
        if sys.argv[1:2] and sys.argv[1] in _READ_ONLY and (e.code is None or isinstance(e.code, int)):
            _exit_now(e.code or 0)
        raise


def _exit_now(code: int) -> NoReturn:
    for thread in threading.enumerate():  # what the interpreter would wait for (a tower still being opened)
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
