"""How the `clipdex` program starts and ends, before typer and its commands are imported: a search's towers start
opening at once, and a search's process ends without the interpreter's teardown.

Nothing here imports typer, rich or the commands: `run` peeks at a search's command line and starts opening what it
needs (`cli/early.py`), then imports the app (`clipdex.cli.main`), which parses it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import NoReturn

from clipdex.cli.early import warm_early

# numpy's OpenBLAS starts its threads when numpy is imported, and each spins on a core for 2^28 cycles (0.13 s at
# 2 GHz) after its start and after every call before it sleeps: beside the session ONNX Runtime is opening for a cold
# search, or its threads encoding a batch, that is a core taken from them. 2^20 cycles (0.5 ms) still keeps them
# awake between the calls of one computation. It has to be set before numpy is imported; a user's setting stays.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

# Commands that only read and print. Once a search has printed and every thread it started has ended, the process
# ends without the interpreter's teardown: ONNX Runtime's sessions, FAISS's indexes and some 600 modules freed one by
# one, which took 0.1 s of a cold search (0.87 s against 0.75 s, medians of 8 pairs), memory the system frees at once.
_READ_ONLY = frozenset({"search"})


def run() -> None:
    """The `clipdex` program (its console script and `python -m clipdex`): a search's towers opened early, `main`,
    then a quick exit after a search. `main` itself returns as any function does, for whoever calls it in a process
    that goes on."""
    with contextlib.suppress(Exception):  # only a head start: the command itself says what is wrong
        warm_early(sys.argv[1:])
    from clipdex.cli.main import main

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
