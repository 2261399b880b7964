"""The `clipdex` command. Each subcommand builds a typed config and calls one library function."""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from clipdex.retrieval.errors import ClipdexError

app = typer.Typer(
    name="clipdex",
    help="Cross-modal image–text search: index photos and captions with CLIP, search them in milliseconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def _friendly(fn: F) -> F:
    """Turn user errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClipdexError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(130 if type(e).__name__ == "Interrupted" else 2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class TargetOpt(str, Enum):
    images = "images"
    texts = "texts"


IndexDir = Annotated[Path, typer.Option("--index", "-i", help="Index directory.", show_default=False)]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="open_clip architecture (e.g. ViT-B-32), hf-hub:org/repo, or a model-config JSON file. "
        "Default: ViT-B-32 for a new index, the index's own model otherwise."
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(help="Pretrained tag (e.g. laion2b_s34b_b79k), hf-hub:org/repo, or a local checkpoint file."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]
IndexTypeOpt = Annotated[
    str | None, typer.Option(help="FAISS factory string, e.g. IVF4096,SQ8 (default: chosen by size and --memory).")
]
MemoryOpt = Annotated[str | None, typer.Option(help="Memory budget for each ANN index, e.g. 4G (default: none).")]
TargetRecallOpt = Annotated[
    float | None, typer.Option(min=0.0, max=1.0, help="Recall@10 against exact search to tune for (default 0.95).")
]


def _ann_settings(
    index_type: str | None, memory: str | None, target_recall: float | None, *, keep_default: bool
) -> Any:
    from clipdex.retrieval.ann import DEFAULT_TARGET_RECALL, parse_memory
    from clipdex.retrieval.build import AnnSettings

    if keep_default and index_type is None and memory is None and target_recall is None:
        return None
    try:
        budget = parse_memory(memory) if memory else None
    except ValueError as e:
        raise ClipdexError(str(e)) from None
    # --index-type is checked by the library at the index's own dimension
    return AnnSettings(index_type, budget, DEFAULT_TARGET_RECALL if target_recall is None else target_recall)


DeviceOpt = Annotated[Device, typer.Option(help="Where to run the model.")]


class _RichProgress:
    def __init__(self, progress: Progress):
        self._progress = progress
        self._task: Any = None

    def start(self, what: str, total: int | None) -> None:
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(what, total=total)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=False,
    )


def _encoder_config(model: str | None, pretrained: str | None, device: Device, index_dir: Path | None = None) -> Any:
    """The model the user named; --pretrained alone names weights for the index's own architecture (or the
    default one for a new index)."""
    from clipdex.retrieval.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, EncoderConfig
    from clipdex.retrieval.manifest import MANIFEST, index_model

    if model is None and pretrained is None:
        return None
    if model is None:
        existing = index_dir is not None and (index_dir / MANIFEST).is_file()
        model = index_model(index_dir) if existing and index_dir is not None else DEFAULT_MODEL
        return EncoderConfig(model=model, pretrained=pretrained, device=device.value)
    if pretrained is None and not model.startswith(("hf-hub:", "local-dir:")):
        if model == DEFAULT_MODEL:
            pretrained = DEFAULT_PRETRAINED
        else:
            raise ClipdexError(
                f"--model {model} needs --pretrained: a tag, hf-hub:org/repo, or a local checkpoint file"
            )
    return EncoderConfig(model=model, pretrained=pretrained, device=device.value)


@app.command()
@_friendly
def index(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Folders (walked recursively) and image files.", show_default=False)
    ] = None,
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    texts: Annotated[Path | None, typer.Option(help="Caption file: .txt, .csv, .tsv, .jsonl or .parquet.")] = None,
    text_column: Annotated[str | None, typer.Option(help="Text column (default: caption, then text).")] = None,
    image_column: Annotated[
        str | None, typer.Option(help="Column of image paths, relative to the caption file (default: image).")
    ] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder batch.")] = 64,
    workers: Annotated[int | None, typer.Option(min=0, help="Decode worker processes (default: cores - 1).")] = None,
    device: DeviceOpt = Device.auto,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Refuse images with more pixels than this, without decoding them.")
    ] = 178_956_970,
    strict: Annotated[bool, typer.Option(help="Exit non-zero when any file failed.")] = False,
    commit_every: Annotated[int, typer.Option(min=1, help="Commit to the catalog every N batches.")] = 16,
    publish_every: Annotated[
        float, typer.Option(min=0, help="Make committed work searchable at most every N seconds during a run.")
    ] = 60.0,
    index_type: IndexTypeOpt = None,
    memory: MemoryOpt = None,
    target_recall: TargetRecallOpt = None,
    profile: Annotated[
        bool, typer.Option(help="Report where the time went (scan, decode wait, encode, write).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Index folders of images and/or a caption file; re-running only encodes what changed."""
    from clipdex.indexer.pipeline import IndexConfig, run_index

    config = IndexConfig(
        paths=tuple(paths or ()),
        index_dir=index_dir,
        texts=texts,
        text_column=text_column,
        image_column=image_column,
        encoder=_encoder_config(model, pretrained, device, index_dir),
        device=device.value,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
        commit_every=commit_every,
        publish_every_s=publish_every,
        ann=_ann_settings(index_type, memory, target_recall, keep_default=True),
    )
    with _progress() as bar:
        summary = run_index(config, progress=_RichProgress(bar))
    if as_json:
        print(json.dumps(summary.to_json()))
    else:
        table = Table(title=f"clipdex index → {index_dir}", show_header=True)
        for key in summary.to_json():
            table.add_column(key, justify="right")
        table.add_row(*(str(v) for v in summary.to_json().values()))
        out.print(table)
        for path, reason in summary.failures[:20]:
            err.print(f"[yellow]failed[/] {path}: {reason}", highlight=False, soft_wrap=True)
        if len(summary.failures) > 20:
            err.print(f"… and {len(summary.failures) - 20} more: `clipdex info --failed --index {index_dir}`")
    for note in summary.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    if profile:
        total = sum(summary.seconds.values())
        parts = (
            ", ".join(f"{k} {v:.2f}s ({100 * v / total:.0f}%)" for k, v in summary.seconds.items()) if total else "-"
        )
        err.print(f"time: {parts}", highlight=False, soft_wrap=True)
    if strict and summary.failed:
        raise typer.Exit(1)


@app.command()
@_friendly
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
    from clipdex.retrieval.search import Searcher, Target

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
        print(
            json.dumps(
                {"query": shown, "target": tgt.value, "results": [h.to_json() for h in hits]}, ensure_ascii=False
            )
        )
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


@app.command()
@_friendly
def info(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    failed: Annotated[bool, typer.Option("--failed", help="List the items that failed, with the reason.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Describe an index: model, dimension, counts, index types, size on disk."""
    from clipdex.retrieval.info import index_info

    data = index_info(index_dir, with_failures=failed)
    if as_json:
        print(json.dumps(data, ensure_ascii=False))
        return
    table = Table(show_header=False, title=f"clipdex index {index_dir}")
    table.add_column("", style="bold")
    table.add_column("")
    model = data["model"]
    table.add_row("model", f"{model['name']} / {model['pretrained']}")
    table.add_row("dim", str(data["dim"]))
    for key, value in data["counts"].items():
        table.add_row(key, str(value))
    for key, value in data["index_types"].items():
        tuned = data["ann"].get(key, {})
        extra = f" ({tuned['params']}, recall@10 {tuned['recall_at_10']:.3f})" if tuned.get("params") else ""
        table.add_row(f"{key} index", value + extra)
    table.add_row("size on disk", _human_bytes(data["size_bytes"]))
    table.add_row("format", str(data["format_version"]))
    out.print(table)
    if failed:
        fails = Table(title="failed items", show_header=True)
        fails.add_column("path or text", overflow="fold")
        fails.add_column("reason", overflow="fold")
        for item in data["failures"]:
            fails.add_row(item["path"] or item["text"] or "", item["error"] or "")
        out.print(fails)


@app.command()
@_friendly
def build(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    index_type: IndexTypeOpt = None,
    memory: MemoryOpt = None,
    target_recall: TargetRecallOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild the ANN indexes from the stored vectors (no re-encoding): choose, train, tune."""
    from clipdex.indexer.importer import rebuild

    manifest = rebuild(index_dir, _ann_settings(index_type, memory, target_recall, keep_default=False))
    _print_ann(manifest, as_json)


@app.command("import")
@_friendly
def import_(
    src: Annotated[
        Path, typer.Argument(help="clip-retrieval output folder (img_emb/, text_emb/, metadata/).", show_default=False)
    ],
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = Device.auto,
    index_type: IndexTypeOpt = None,
    memory: MemoryOpt = None,
    target_recall: TargetRecallOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build an index from clip-retrieval embeddings without re-encoding; --model encodes the queries."""
    from clipdex.indexer.importer import import_clip_retrieval
    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.manifest import read_manifest

    encoder = _encoder_config(model, pretrained, device) or EncoderConfig(device=device.value)
    settings = _ann_settings(index_type, memory, target_recall, keep_default=False)
    summary = import_clip_retrieval(src, index_dir, encoder, settings)
    manifest = read_manifest(index_dir)
    if as_json:
        print(json.dumps({**summary.to_json(), "ann": manifest.ann}))
    else:
        out.print(f"imported {summary.images} images and {summary.texts} texts from {summary.partitions} partitions")
        _print_ann(manifest, False)


def _print_ann(manifest: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ann": manifest.ann, "counts": manifest.counts}))
        return
    table = Table(title="ANN indexes", show_header=True)
    for col in ("kind", "vectors", "index", "params", "recall@10", "why"):
        table.add_column(col)
    for kind, info in manifest.ann.items():
        recall = info.get("recall_at_10")
        table.add_row(
            kind,
            str(info.get("n")),
            info.get("factory", ""),
            info.get("params") or "-",
            "-" if recall is None else f"{recall:.3f}",
            info.get("reason", ""),
        )
    out.print(table)


@app.command()
@_friendly
def remove(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders: every item at or under them goes.", show_default=False)
    ],
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    as_json: JsonOpt = False,
) -> None:
    """Remove items from an index, whether or not their files still exist (no model is loaded)."""
    from clipdex.indexer.remove import remove_paths

    summary = remove_paths(index_dir, paths)
    if as_json:
        print(json.dumps(summary.to_json()))
    else:
        out.print(f"removed {summary.removed} items", highlight=False)
        if summary.unlinked_texts:
            out.print(f"{summary.unlinked_texts} captions lost their image and are kept as texts", highlight=False)
    for path in summary.not_indexed:
        err.print(f"[yellow]note:[/] nothing indexed at or under {path}", highlight=False, soft_wrap=True)


@app.command()
@_friendly
def check(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Restore a consistent index from what is intact first, and say what was lost."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify that manifest, catalog, vectors and FAISS indexes agree; exit 1 and list what is wrong if not."""
    from clipdex.retrieval.check import check_index

    repaired = None
    if repair:
        from clipdex.retrieval.repair import repair_index

        repaired = repair_index(index_dir)
    report = check_index(index_dir)
    if as_json:
        print(json.dumps({**report.to_json(), **({"repair": repaired.to_json()} if repaired else {})}))
    else:
        if repaired is not None:
            for action in repaired.actions:
                err.print(f"[green]repaired:[/] {action}", highlight=False, soft_wrap=True)
            for lost in repaired.lost:
                err.print(f"[yellow]lost:[/] {lost}", highlight=False, soft_wrap=True)
        for note in report.notes:
            err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
        for problem in report.problems:
            out.print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
        if report.ok:
            counts = ", ".join(f"{v} {k}" for k, v in report.counts.items())
            out.print(f"[green]ok[/]: {index_dir} is consistent ({counts})", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


class DatasetOpt(str, Enum):
    flickr30k = "flickr30k"
    coco = "coco"


@app.command("eval")
@_friendly
def eval_(
    dataset: Annotated[DatasetOpt, typer.Argument(help="Which benchmark.")],
    root: Annotated[Path, typer.Option(help="Dataset folder (layouts: data/README.md).", show_default=False)] = ...,  # type: ignore[assignment]
    split: Annotated[str, typer.Option(help="Karpathy split: train, val or test.")] = "test",
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    index_dir: Annotated[
        Path | None, typer.Option("--index", "-i", help="Evaluate the model this index was built with.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder batch.")] = 64,
    workers: Annotated[int | None, typer.Option(min=0, help="Decode worker processes (default: cores - 1).")] = None,
    device: DeviceOpt = Device.auto,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N images (a quick run).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure text→image and image→text recall@1/5/10 exactly as CLIP_benchmark does."""
    from clipdex.indexer.decode import default_workers
    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.datasets import DatasetName
    from clipdex.retrieval.evaluate import EvalConfig, evaluate
    from clipdex.retrieval.manifest import index_encoder_config

    if index_dir is not None:
        if model or pretrained:
            raise ClipdexError("give either --index or --model/--pretrained, not both")
        encoder, _ = index_encoder_config(index_dir, device=device.value)
    else:
        encoder = _encoder_config(model, pretrained, device) or EncoderConfig(device=device.value)
    config = EvalConfig(
        dataset=DatasetName(dataset.value),
        root=root,
        encoder=encoder,
        split=split,
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
        limit=limit,
    )
    result = evaluate(config)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(
        title=f"{result['dataset']} {result['split']}: {result['model']} / {result['pretrained']} "
        f"({result['images']} images, {result['texts']} texts)"
    )
    table.add_column("direction")
    for k in result["text_to_image"]:
        table.add_column(k, justify="right")
    for key, label in (("text_to_image", "text → image"), ("image_to_text", "image → text")):
        table.add_row(label, *(f"{100 * v:.2f}" for v in result[key].values()))
    out.print(table)
    out.print(f"{result['images_per_s']:.1f} images/s, {result['texts_per_s']:.1f} texts/s")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


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


def main() -> None:
    _setup_logging()
    # clipdex applies its own pixel limit (--max-pixels) before decoding; PIL's warning below its own would be noise
    warnings.filterwarnings("ignore", message=".*could be decompression bomb DOS attack")
    app()


if __name__ == "__main__":
    main()
