"""Commands that answer queries: search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

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
    as_json: JsonOpt = False,
) -> None:
    """Search an index with a text or an image (image→image by default)."""
    from clipdex.retrieval.search import Searcher, Target, results_json

    if (query is None) == (image is None):
        raise ClipdexError("give either a text query or --image FILE (not both)")
    searcher = Searcher(index_dir, device=device.value)
    tgt = Target(target.value)
    if query is not None:
        hits, shown = searcher.search_text(query, k=k, target=tgt), query
    else:
        assert image is not None
        hits, shown = searcher.search_image(image, k=k, target=tgt), str(image)
    if as_json:
        print(json.dumps(results_json(shown, tgt, hits), ensure_ascii=False))
        return
    table = Table(title=f"{shown!r} → {tgt.value}", show_header=True)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("path" if tgt is Target.IMAGES else "text", overflow="fold")
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.4f}", (h.path or "") if tgt is Target.IMAGES else (h.text or ""))
    out.print(table)
    if not hits:
        err.print(f"the index holds no {tgt.value}")
