"""Commands that answer queries: search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from clipdex.cli.common import (
    Device,
    DeviceOpt,
    IndexDir,
    JsonOpt,
    TargetOpt,
    app,
    err,
    friendly,
    lean_model_imports,
    out,
)
from clipdex.retrieval.errors import ClipdexError


@app.command(rich_help_panel="Search")
@friendly
def search(
    query: Annotated[str | None, typer.Argument(help="Text query.", show_default=False)] = None,
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    image: Annotated[Path | None, typer.Option(help="Query with an image file instead of text.")] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Number of results.")] = 10,
    target: Annotated[TargetOpt, typer.Option(help="Search images or texts.")] = TargetOpt.images,
    device: DeviceOpt = Device.auto,
    use_server: Annotated[
        bool, typer.Option("--server/--no-server", help="Let a running `clipdex serve` of this index answer.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Search an index with a text or an image (image→image by default).

    When `clipdex serve` runs for this index on this machine, it answers (the same results, without loading the
    model here); otherwise the search runs in this process."""
    if (query is None) == (image is None):
        raise ClipdexError("give either a text query or --image FILE (not both)")
    from clipdex.retrieval.manifest import read_manifest

    read_manifest(index_dir)  # a missing or damaged index is said before anything heavy loads
    shown = query if query is not None else str(image)
    answer = _ask_server(index_dir, query, image, k, target.value) if use_server else None
    if answer is None:
        lean_model_imports(index_dir)
        from clipdex.retrieval.search import Searcher, Target, results_json

        searcher = Searcher(index_dir, device=device.value)
        tgt = Target(target.value)
        if query is not None:
            hits = searcher.search_text(query, k=k, target=tgt)
        else:
            assert image is not None
            hits = searcher.search_image(image, k=k, target=tgt)
        answer = results_json(shown, tgt, hits)
    answer["query"] = shown  # an image sent to a server is named there by its bytes only
    if as_json:
        print(json.dumps(answer, ensure_ascii=False))
        return
    _print_table(answer)


def _ask_server(index_dir: Path, query: str | None, image: Path | None, k: int, target: str) -> dict[str, Any] | None:
    from clipdex.retrieval.remote import search_via_server

    if image is None:
        return search_via_server(index_dir, k=k, target=target, text=query)
    from clipdex.retrieval.imaging import read_query_image
    from clipdex.retrieval.paths import canonical

    return search_via_server(index_dir, k=k, target=target, image=read_query_image(canonical(image)))


def _print_table(answer: dict[str, Any]) -> None:
    images = answer["target"] == "images"
    table = Table(title=f"{answer['query']!r} → {answer['target']}", show_header=True)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("path" if images else "text", overflow="fold")
    for h in answer["results"]:
        table.add_row(str(h["rank"]), f"{h['score']:.4f}", (h["path"] if images else h["text"]) or "")
    out.print(table)
    if not answer["results"]:
        err.print(f"the index holds no {answer['target']}")
