"""Commands that answer queries: search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from clipdex.cli.common import (
    Device,
    DeviceOpt,
    IndexDir,
    JsonOpt,
    RuntimeOpt,
    TargetOpt,
    app,
    err,
    friendly,
    lean_model_imports,
    out,
)
from clipdex.cli.early import warming
from clipdex.retrieval.errors import ClipdexError
from clipdex.retrieval.search.request import DEFAULT_RERANK_K, MODES, OFFLINE, SORTS


@app.command(rich_help_panel="Search")
@friendly
def search(
    query: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="QUERY",
            help='Text query, quoted when it has several words (`"2:red car"` weighs it 2).',
            show_default=False,
        ),
    ] = None,
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    image: Annotated[Path | None, typer.Option(help="Query with an image file (image→image by default).")] = None,
    like: Annotated[int | None, typer.Option(help="Query with an indexed item's vector, by id.")] = None,
    add: Annotated[
        list[str] | None, typer.Option(help="Add a text to the query (repeatable; `2:text` weighs it).")
    ] = None,
    subtract: Annotated[list[str] | None, typer.Option(help="Subtract a text from the query (repeatable).")] = None,
    add_image: Annotated[list[Path] | None, typer.Option(help="Add an image file to the query (repeatable).")] = None,
    subtract_image: Annotated[list[Path] | None, typer.Option(help="Subtract an image file (repeatable).")] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Number of results.")] = 10,
    target: TargetOpt = "images",
    include_self: Annotated[
        bool,
        typer.Option(
            "--include-self/--hide-self",
            help="Keep the indexed items the query is made of (a --like item, the indexed image an --image file is, "
            "and its copies). They are left out by default.",
        ),
    ] = False,
    dedup: Annotated[bool, typer.Option(help="Leave out results nearly identical to a better one.")] = False,
    dedup_threshold: Annotated[
        float, typer.Option(min=-1.0, max=1.0, help="Cosine at which --dedup collapses.")
    ] = 0.95,
    where: Annotated[
        str | None,
        typer.Option(help="A DuckDB condition on the items' columns, e.g. \"ext = 'heic' AND width > 3000\"."),
    ] = None,
    in_folder: Annotated[Path | None, typer.Option("--in", help="Only items at or under this folder.")] = None,
    after: Annotated[str | None, typer.Option(help="Only photos taken (else modified) on or after this date.")] = None,
    before: Annotated[str | None, typer.Option(help="Only photos taken (else modified) before this date.")] = None,
    min_score: Annotated[float | None, typer.Option(help="Only results scoring at least this cosine.")] = None,
    sort: Annotated[
        str,
        typer.Option(
            help="Order the results found: by score, date (capture time, else modified; -date newest first) or name.",
            metavar="score|date|-date|name",
        ),
    ] = "score",
    offline: Annotated[
        str,
        typer.Option(
            help="Items on a drive or folder that could not be read at the last `clipdex index`: hide them, or show "
            "them flagged.",
            metavar="hide|show",
        ),
    ] = "hide",
    rerank: Annotated[
        int | None,
        typer.Option(
            metavar="[K]",
            min=1,
            help=f"Re-score the top K results (default {DEFAULT_RERANK_K}) with the index's re-ranking head "
            "(`clipdex finetune PAIRS --method rerank --index`); a text query over images, or an image over texts.",
            show_default=False,
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="Rank by meaning (semantic: CLIP), by the words of captions and of text read in images (lexical: "
            "every word must appear, as a word, prefix or part of one), or both fused by reciprocal rank (hybrid).",
            metavar="semantic|lexical|hybrid",
            show_default="hybrid for a text query when the index reads words in images (index --ocr), else semantic",
        ),
    ] = None,
    relevant: Annotated[
        bool,
        typer.Option(
            "--relevant",
            help="Instead of -k results, every one judged relevant: a cut-off calibrated on this query's own scores "
            "over the library (at most 1000).",
        ),
    ] = False,
    paths: Annotated[bool, typer.Option("--paths", help="Print only the paths, one per line (for xargs).")] = False,
    device: DeviceOpt = Device.auto,
    runtime: RuntimeOpt = None,
    use_server: Annotated[
        bool, typer.Option("--server/--no-server", help="Let a running `clipdex serve` of this index answer.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Search an index with words, an image, an indexed item, or a sum of them.

    Each term is embedded and normalised, weighted (+1 for the query and each --add, -1 for each --subtract), summed
    and normalised again; results rank by cosine with that vector. When `clipdex serve` runs for this index on this
    machine, it answers (the same results, without loading the model here)."""
    text = _one_query(query)
    if sum(x is not None for x in (text, image, like)) > 1:
        raise ClipdexError(
            "give only one of a text query, --image FILE or --like ID; add more terms with --add/--subtract"
        )
    if offline not in OFFLINE:
        raise ClipdexError(f"--offline is hide or show (got {offline!r})")
    if sort not in SORTS:
        raise ClipdexError(f"--sort is score, date, -date or name (got {sort!r})")
    if mode is not None and mode not in MODES:
        raise ClipdexError(f"--mode is semantic, lexical or hybrid (got {mode!r})")
    if paths and as_json:
        raise ClipdexError("--paths and --json are two ways to print the results: choose one")
    from clipdex.retrieval.config import Kind
    from clipdex.retrieval.search.request import SearchRequest
    from clipdex.retrieval.store.manifest import read_manifest

    manifest = read_manifest(index_dir)  # a missing or damaged index is said before anything heavy loads
    asked = SearchRequest(
        q=text,
        like=like,
        add=tuple(add or ()),
        subtract=tuple(subtract or ()),
        k=k,
        target=Kind(target),
        include_self=include_self,
        dedup=dedup_threshold if dedup else None,
        in_folder=str(in_folder) if in_folder else None,
        after=after,
        before=before,
        min_score=min_score,
        rerank=rerank,
        relevant=relevant,
        mode=mode,
        offline=offline,
        sort=sort,
        image=image,
        add_image=tuple(add_image or ()),
        subtract_image=tuple(subtract_image or ()),
        where=where,
    )
    q = asked.query()  # a bad query or filter is said before a server is asked or the model loads
    asked.filter()
    local_only = add_image or subtract_image or where  # compose image files and run SQL here
    answer = None
    if use_server and not local_only:
        from clipdex.retrieval.serve.remote import search_via_server

        answer = search_via_server(index_dir, asked)
    if answer is None:
        lean_model_imports(manifest.model)
        chosen = runtime.value if runtime else None
        towers = () if mode == "lexical" else q.towers()
        encoder = warming(index_dir, towers, device.value, chosen)
        from clipdex.retrieval.search.searcher import Searcher

        # `warming` has looked for the export already: where it found none, the searcher need not look again
        searcher = Searcher(index_dir, device=device.value, runtime=chosen, encoder=encoder)
        if encoder is not None and not searcher.manifest.model.same_model(encoder.spec):  # reindexed meanwhile
            searcher = Searcher(index_dir, device=device.value, runtime=chosen, warm=towers)
        answer = searcher.answer(asked)
    answer["query"] = q.label()  # an image sent to a server is named there by its bytes only
    if q.describe() is not None:  # the terms as this command names them (a server saw the image as bytes)
        answer["terms"] = q.describe()
    if as_json:
        print(json.dumps(answer, ensure_ascii=False))
    elif paths:
        for h in answer["results"]:
            if h["path"]:
                print(h["path"])
    else:
        _print_results(answer)


def _print_results(answer: dict[str, Any]) -> None:
    """A table on a terminal (paths never wrapped); plain tab-separated lines when piped."""
    results, images = answer["results"], answer["target"] == "images"
    reranked = any("rerank" in h for h in results)  # then a last column: the head's score
    if not out.is_terminal:
        for h in results:
            cells = [str(h["rank"]), f"{h['score']:.4f}", _path_cell(h), _words_cell(h).replace("\n", " ")]
            print("\t".join(cells + ([_rerank_cell(h)] if reranked else [])))
    else:
        from rich.table import Table

        table = Table(title=f"{answer['query']!r} → {answer['target']}", show_header=True)
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        if images:
            table.add_column("path", no_wrap=True, overflow="ellipsis")
            table.add_column(
                "caption / words in it" if any(h.get("ocr") for h in results) else "caption", overflow="fold"
            )
        else:
            table.add_column("text", overflow="fold")
            table.add_column("image", no_wrap=True, overflow="ellipsis")
        if reranked:
            table.add_column("re-rank", justify="right")
        for h in results:
            cells = [_path_cell(h), _words_cell(h)] if images else [h["text"] or "", _path_cell(h)]
            table.add_row(str(h["rank"]), f"{h['score']:.4f}", *cells, *([_rerank_cell(h)] if reranked else []))
        out.print(table)
    if not results:
        err.print(_nothing_found(answer))


def _path_cell(hit: dict[str, Any]) -> str:
    """A hit's path, marked when it is on a drive or folder that could not be read (`--offline show`)."""
    return (hit["path"] or "") + (" (offline)" if hit.get("offline") else "")


def _words_cell(hit: dict[str, Any]) -> str:
    """An image hit's caption, and the words read in it (`index --ocr`) in quotes."""
    words = " ".join((hit.get("ocr") or "").split())
    return " ".join(part for part in (hit["text"] or "", f"“{words}”" if words else "") if part)


def _rerank_cell(hit: dict[str, Any]) -> str:
    """The head's score of a hit it re-scored; `-` for one after the re-scored top K (or unreadable now)."""
    return f"{hit['rerank']:.4f}" if "rerank" in hit else "-"


def _one_query(words: list[str] | None) -> str | None:
    """The query text: one argument. Several are a multi-word query the shell split: say how to quote it."""
    if not words:
        return None
    if len(words) > 1:
        quoted = " ".join(words).replace('"', '\\"')
        raise ClipdexError(
            f'a query of several words needs quotes: clipdex search "{quoted}" (got {len(words)} arguments)'
        )
    return words[0]


def _nothing_found(answer: dict) -> str:
    """Why a search found nothing, truthfully: a filter that matches nothing is not an empty index."""
    target, plan = answer["target"], answer.get("filter")
    if plan is not None and not plan.get("matched"):
        return f"no {target.removesuffix('s')} matches the filter ({plan.get('indexed', 0)} {target} indexed)"
    if answer.get("mode") == "lexical":
        return f"no {target.removesuffix('s')} holds all the words of {answer['query']!r} (captions and words read in images)"
    return f"no {target} found" if answer.get("terms") or plan is not None else f"the index holds no {target}"


@app.command(rich_help_panel="Search")
@friendly
def duplicates(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    threshold: Annotated[
        float, typer.Option(min=-1.0, max=1.0, help="Cosine at which two images are duplicates.")
    ] = 0.95,
    as_json: JsonOpt = False,
) -> None:
    """Groups of near-duplicate images: every pair at or above --threshold joins, largest groups first."""
    from clipdex.retrieval.store.manifest import read_manifest

    read_manifest(index_dir)
    from clipdex.retrieval.search.duplicates import find_duplicates
    from clipdex.retrieval.search.searcher import Searcher

    found = find_duplicates(Searcher(index_dir, device="cpu"), threshold=threshold)
    if as_json:
        print(json.dumps(found.to_json(), ensure_ascii=False))
        return
    if not out.is_terminal:
        for n, group in enumerate(found.groups, 1):
            for m in group:
                print(f"{n}\t{m['score']:.4f}\t{m['bytes'] or ''}\t{m['path']}")
    else:
        from rich.table import Table

        from clipdex.retrieval.config import human_bytes

        table = Table(title=f"near-duplicates at cosine ≥ {threshold} ({found.method} range search)")
        table.add_column("group", justify="right")
        table.add_column("score", justify="right")
        table.add_column("size", justify="right")
        table.add_column("path", no_wrap=True, overflow="ellipsis")
        for n, group in enumerate(found.groups, 1):
            for i, m in enumerate(group):
                table.add_row(
                    str(n) if i == 0 else "", f"{m['score']:.4f}", human_bytes(m["bytes"] or 0), m["path"] or ""
                )
        out.print(table)
    err.print(f"{len(found.groups)} groups, {sum(len(g) for g in found.groups)} images", highlight=False)


@app.command(rich_help_panel="Search")
@friendly
def classify(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    labels: Annotated[str | None, typer.Option(help="Classes, comma-separated: 'cat,dog,car'.")] = None,
    labels_file: Annotated[Path | None, typer.Option(help="Classes, one a line.")] = None,
    templates: Annotated[
        Path | None, typer.Option(help="Prompt templates, one a line, {} marking the label (default: CLIP's seven).")
    ] = None,
    eval_folder: Annotated[
        Path | None,
        typer.Option("--eval", help="Measure accuracy on a folder whose subfolders name the classes (no --labels)."),
    ] = None,
    store: Annotated[
        bool, typer.Option("--store/--no-store", help="Keep the labels in the index, for --where \"label = 'cat'\".")
    ] = True,
    device: DeviceOpt = Device.auto,
    as_json: JsonOpt = False,
) -> None:
    """Zero-shot labels for every indexed image, with the index's own model; or accuracy on a labelled folder."""
    from clipdex.retrieval.search.classify import (
        evaluate_folder,
        label_images,
        read_labels,
        read_templates,
        store_labels,
    )
    from clipdex.retrieval.store.manifest import read_manifest

    read_manifest(index_dir)  # the index, the options and the inputs are checked before the model loads
    prompts = read_templates(templates)
    if eval_folder is not None:
        if labels is not None or labels_file is not None:
            raise ClipdexError("--eval takes the classes from the folder's subfolders: drop --labels")
        if not eval_folder.is_dir():
            raise ClipdexError(f"no such folder: {eval_folder}")
    else:
        classes = read_labels(labels, labels_file)
    from clipdex.retrieval.search.searcher import Searcher

    searcher = Searcher(index_dir, device=device.value)
    if eval_folder is not None:
        result = evaluate_folder(searcher.encoder, eval_folder, prompts)
        if as_json:
            print(json.dumps(result))
        else:
            acc5 = "" if result["acc5"] != result["acc5"] else f", top-5 {result['acc5']:.4f}"
            out.print(
                f"{result['images']} images, {len(result['classes'])} classes: top-1 {result['acc1']:.4f}{acc5}, "
                f"mean per-class recall {result['mean_per_class_recall']:.4f}",
                highlight=False,
            )
        return
    found = label_images(searcher, classes, prompts)
    if store:
        from clipdex.retrieval.errors import DiskFullError, DiskIOError, ReadOnlyError

        try:
            store_labels(index_dir, found)
        except (ReadOnlyError, DiskFullError, DiskIOError) as e:  # the labels are still printed
            err.print(f"[yellow]note:[/] could not store the labels in the index: {e}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps(found.to_json(), ensure_ascii=False))
        return
    if not out.is_terminal:
        for item in found.items:
            print(f"{item['label']}\t{item['score']:.4f}\t{item['path']}")
        return
    from rich.table import Table

    table = Table(title=f"zero-shot labels ({len(found.labels)} classes)")
    table.add_column("label")
    table.add_column("score", justify="right")
    table.add_column("path", no_wrap=True, overflow="ellipsis")
    for item in found.items:
        table.add_row(item["label"], f"{item['score']:.4f}", item["path"] or "")
    out.print(table)
