"""The `clipdex` command. Each subcommand builds a typed config and calls one library function.

The commands live by subject in cli/library.py, cli/watch.py, cli/query.py, cli/serve.py and cli/models.py; importing
them registers them.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from typing import Annotated

import typer
from typer.main import get_command_name

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
    app_for(sys.argv[1:])()


def app_for(argv: list[str]) -> typer.Typer:
    """The app, holding only the command `argv` runs when it names one. typer turns every command's signature into
    click parameters before it parses anything (0.04-0.06 s for all 16 commands, a tenth of a cold search), and a
    command line runs one of them. Without a command name (`clipdex`, `--help`, `--version`) or with a name that is
    none of them, the whole app: its help and its errors list them all."""
    named = [c for c in app.registered_commands if argv and _name(c) == argv[0]]
    if not named:
        return app
    lean = copy.copy(app)
    lean.registered_commands = named
    return lean


def _name(command: typer.models.CommandInfo) -> str:
    return command.name or get_command_name(command.callback.__name__)  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
