"""A search's towers opened before typer parses its command line (`warm_early`, called by `cli/start.py`), and taken
by the search when it is for the same index, device and runtime (`warming`, called by `clipdex search`). Imports no
typer, rich or commands."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Encoders whose towers `warm_early` began to open, by (index folder, device, runtime): the search takes its own.
_early: dict[tuple[Path, str, str | None], tuple[Any, frozenset[str]]] = {}
_TOWER_OPTIONS = {"--image": "image", "--add-image": "image", "--subtract-image": "image", "--add": "text",
                  "--subtract": "text"}  # fmt: skip


def warm_early(argv: list[str]) -> None:
    """Before typer parses a `clipdex search` command line (and its imports follow), open the towers it will need in
    a thread, so that ONNX Runtime's 0.2-0.3 s of making a session, which it does without the GIL, runs beside them.
    The command line is only peeked at: the index (--index, -i, $CLIPDEX_INDEX), --device, --runtime, whether an
    image or a text is embedded, --mode lexical, --no-server. typer still parses it, and the search takes this
    encoder only when it is for the same index, device and runtime (`warming`); a wrong guess costs time only."""
    if argv[:1] != ["search"] or "--help" in argv:
        return
    asked: dict[str, str] = {}
    positional, towers = False, set()
    rest = iter(argv[1:])
    for arg in rest:
        name, eq, value = arg.partition("=")
        if name in ("--index", "-i", "--device", "--runtime", "--mode", "--like", *_TOWER_OPTIONS):
            asked[name] = value if eq else next(rest, "")
            towers.add(_TOWER_OPTIONS.get(name, ""))
        elif arg == "--no-server":
            asked[arg] = ""
        elif not arg.startswith("-"):
            positional = True  # a query text, or the value of an option not looked at here
    if positional and "--image" not in asked and "--like" not in asked:
        towers.add("text")
    towers.discard("")
    index = asked.get("--index") or asked.get("-i") or os.environ.get("CLIPDEX_INDEX")
    if not towers or not index or asked.get("--mode") == "lexical":
        return
    index_dir = Path(index)
    if "--no-server" not in asked:
        from clipdex.retrieval.serve.remote import live_server

        if live_server(index_dir) is not None:
            return  # it answers: nothing to open here
    device, runtime = asked.get("--device", "auto"), asked.get("--runtime") or os.environ.get("CLIPDEX_RUNTIME")
    encoder = warming(index_dir, towers, device, runtime)
    if encoder is not None:
        _early[(index_dir.resolve(), device, runtime)] = (encoder, frozenset(towers))


def warming(index_dir: Path, towers: Iterable[str], device: str, runtime: str | None) -> Any:
    """The index's exported model, its query's towers already opening in a thread: ONNX Runtime makes a session
    (0.2-0.3 s for ViT-B-32's text tower) without the GIL, so it overlaps the imports and the snapshot read that
    follow instead of coming after them. None when nothing is to be opened, or the model is not exported (or
    anything else: the query then meets and says it). An encoder `warm_early` made for the same index, device and
    runtime is taken, and opens any tower it was not asked for."""
    if not towers:
        return None
    early = _early.pop((index_dir.resolve(), device, runtime), None)
    if early is not None:
        encoder, opening = early
        if not opening.issuperset(towers):
            encoder.warm_later(set(towers) - opening)
        return encoder
    from clipdex.retrieval.model.choose import exported_index_encoder

    try:
        encoder = exported_index_encoder(index_dir, device=device, runtime=runtime)
    except Exception:
        return None
    if encoder is not None:
        encoder.warm_later(towers)
    return encoder
