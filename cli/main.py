"""The `clipdex` command. Each subcommand builds a typed config and calls one library function.

The commands live by subject in cli/library.py, cli/watch.py, cli/query.py, cli/serve.py and cli/models.py; importing
them registers them.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Annotated

import typer

from clipdex.cli import library, models, query, serve, watch  # noqa: F401 (registers the commands)
from clipdex.cli.common import app, version_callback

__all__ = ["app", "main"]


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
    app()


if __name__ == "__main__":
    main()
