"""Commands that build and keep an index: index, remove, build, import, export, check, info, reindex."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clipdex.cli.common import (
    BatchSizeOpt,
    Device,
    DeviceOpt,
    EngineOpt,
    EngineOption,
    ExcludeOpt,
    Float16Opt,
    ImageColumnOpt,
    IndexDir,
    IndexTypeOpt,
    JsonOpt,
    MemoryOpt,
    ModelAnyOpt,
    ModelOpt,
    OcrOpt,
    OnDiskOpt,
    PathsArg,
    PrecisionOpt,
    PretrainedOpt,
    RayAddressOpt,
    RichProgress,
    RuntimeOpt,
    TargetRecallOpt,
    TextColumnOpt,
    TextsOpt,
    WorkersOpt,
    ann_settings,
    app,
    encoder_config,
    err,
    friendly,
    out,
    print_ann,
    print_table,
    progress_bar,
)
from clipdex.retrieval.config import human_bytes


@app.command(rich_help_panel="Index")
@friendly
def index(
    paths: PathsArg = None,
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    texts: TextsOpt = None,
    text_column: TextColumnOpt = None,
    image_column: ImageColumnOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
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
    on_disk: OnDiskOpt = False,
    profile: Annotated[
        bool, typer.Option(help="Report where the time went (scan, decode wait, encode, write).")
    ] = False,
    exclude: ExcludeOpt = None,
    engine: EngineOption = EngineOpt.local,
    ray_address: RayAddressOpt = None,
    prune_missing: Annotated[
        bool,
        typer.Option(
            "--prune-missing",
            help="Remove the items of roots and folders that cannot be read now (an unplugged drive, a folder "
            "without permission) instead of keeping them offline.",
        ),
    ] = False,
    ocr: OcrOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Index folders of images and/or a caption file; re-running only encodes what changed.

    Hidden files and folders (.git, .thumbnails, ._* files) and NAS/system folders (@eaDir, #recycle, $RECYCLE.BIN)
    are skipped, and so is whatever a `.clipdexignore` file (one glob a line) in an indexed folder names."""
    from clipdex.indexer.pipeline import IndexConfig, run_index

    config = IndexConfig(
        paths=tuple(paths or ()),
        index_dir=index_dir,
        texts=tuple(texts or ()),
        text_column=text_column,
        image_column=image_column,
        encoder=encoder_config(model, pretrained, device, index_dir),
        device=device.value,
        runtime=runtime.value if runtime else None,
        precision=precision.value if precision else None,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
        commit_every=commit_every,
        publish_every_s=publish_every,
        ann=ann_settings(index_type, memory, target_recall, keep_default=True, on_disk=on_disk),
        exclude=tuple(exclude or ()),
        engine=engine.value,
        ray_address=ray_address,
        prune_missing=prune_missing,
        ocr=ocr,
    )
    with progress_bar() as bar:
        summary = run_index(config, progress=RichProgress(bar))
    if as_json:
        failures = [{"path": path, "error": reason} for path, reason in summary.failures]
        print(json.dumps({**summary.to_json(), "failures": failures, "notes": summary.notes}, ensure_ascii=False))
    else:
        from rich.table import Table

        table = Table(title=f"clipdex index → {index_dir}", show_header=True)
        for key in summary.to_json():
            table.add_column(key, justify="right")
        table.add_row(*(str(v) for v in summary.to_json().values()))
        print_table(table)
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


@app.command(rich_help_panel="Index")
@friendly
def remove(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders: every item at or under them goes.", show_default=False)
    ],
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    forget: Annotated[
        bool,
        typer.Option(
            "--forget",
            help="Keep them out: a later `clipdex index` of a folder above leaves them out (naming them "
            "again brings them back).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove items from an index, whether or not their files still exist (no model is loaded)."""
    from clipdex.indexer.remove import remove_paths

    summary = remove_paths(index_dir, paths, forget=forget)
    if as_json:
        print(json.dumps(summary.to_json()))
    else:
        out.print(f"removed {summary.removed} items", highlight=False)
        if summary.unlinked_texts:
            out.print(f"{summary.unlinked_texts} captions lost their image and are kept as texts", highlight=False)
    for path in summary.not_indexed:
        err.print(f"[yellow]note:[/] nothing indexed at or under {path}", highlight=False, soft_wrap=True)
    for path in summary.come_back:
        err.print(
            f"[yellow]note:[/] {path} is inside a folder this index keeps up to date: the next `clipdex index` of "
            "that folder brings it back. To keep it out, run this again with --forget (or use --exclude or a "
            ".clipdexignore file)",
            highlight=False,
            soft_wrap=True,
        )


@app.command(rich_help_panel="Index")
@friendly
def build(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    index_type: IndexTypeOpt = None,
    memory: MemoryOpt = None,
    target_recall: TargetRecallOpt = None,
    on_disk: OnDiskOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild the ANN indexes from the stored vectors (no re-encoding): choose, train, tune."""
    from clipdex.indexer.importer import rebuild

    manifest = rebuild(index_dir, ann_settings(index_type, memory, target_recall, keep_default=False, on_disk=on_disk))
    print_ann(manifest, as_json)


@app.command("import", rich_help_panel="Index")
@friendly
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
    on_disk: OnDiskOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build an index from clip-retrieval embeddings without re-encoding; --model encodes the queries.

    With --on-disk --memory M, embeddings larger than memory are read partition by partition and the index's
    inverted lists are written to disk, holding about M in memory for vectors at any time."""
    from clipdex.indexer.importer import import_clip_retrieval
    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.store.manifest import read_manifest

    encoder = encoder_config(model, pretrained, device) or EncoderConfig(device=device.value)
    settings = ann_settings(index_type, memory, target_recall, keep_default=False, on_disk=on_disk)
    summary = import_clip_retrieval(src, index_dir, encoder, settings)
    manifest = read_manifest(index_dir)
    if as_json:
        print(json.dumps({**summary.to_json(), "ann": manifest.to_json()["ann"]}))
    else:
        out.print(f"imported {summary.images} images and {summary.texts} texts from {summary.partitions} partitions")
        print_ann(manifest, False)


@app.command(rich_help_panel="Index")
@friendly
def check(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Restore a consistent index from what is intact first, and say what was lost."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify that manifest, catalog, vectors and FAISS indexes agree; exit 1 and list what is wrong if not."""
    from clipdex.retrieval.maintain.check import check_index

    repaired = None
    if repair:
        from clipdex.retrieval.maintain.repair import repair_index

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


@app.command(rich_help_panel="Index")
@friendly
def info(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    failed: Annotated[bool, typer.Option("--failed", help="List the items that failed, with the reason.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Describe an index: model, dimension, counts, index types, size on disk."""
    from clipdex.retrieval.maintain.info import index_info

    data = index_info(index_dir, with_failures=failed)
    if as_json:
        print(json.dumps(data, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table(show_header=False, title=f"clipdex index {index_dir}")
    table.add_column("", style="bold")
    table.add_column("", no_wrap=True)
    model = data["model"]
    table.add_row("model", f"{model['name']} / {model['pretrained']}")
    table.add_row("runtime", model["runtime"])
    if data["rerank"]:
        table.add_row("re-ranking head", f"{data['rerank']['head']} (search --rerank)")
    if data["ocr"]:
        ocr = data["ocr"]
        table.add_row("words in images", f"{ocr['engine']}: {ocr['images_with_words']} images hold words")
    if data["offline"]["items"]:
        folders = ", ".join(data["offline"]["folders"])
        table.add_row("offline", f"{data['offline']['items']} items, hidden from searches (cannot read {folders})")
    table.add_row("dim", str(data["dim"]))
    for key, value in data["counts"].items():
        table.add_row(key, str(value))
    for key, value in data["index_types"].items():
        tuned = data["ann"].get(key, {})
        extra = f" ({tuned['params']}, recall@10 {tuned['recall_at_10']:.3f})" if tuned.get("params") else ""
        table.add_row(f"{key} index", value + extra)
    table.add_row("size on disk", human_bytes(data["size_bytes"]))
    table.add_row("format", str(data["format_version"]))
    table.add_row("last update", data["updated"] or "never")
    for i, root in enumerate(data["roots"]):
        table.add_row("indexed roots" if i == 0 else "", root)
    print_table(table)  # piped: one `key<TAB>value` line per row, nothing wrapped or cut
    if failed:
        fails = Table(title="failed items", show_header=True)
        fails.add_column("path or text", overflow="fold")
        fails.add_column("reason", overflow="fold")
        for item in data["failures"]:
            fails.add_row(item["path"] or item["text"] or "", item["error"] or "")
        print_table(fails)


@app.command(name="export", rich_help_panel="Index")
@friendly
def export_index(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    out_dir: Annotated[Path, typer.Option("--out", help="A new folder for img_emb/, text_emb/, metadata/.")] = ...,  # type: ignore[assignment]
    float16: Float16Opt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the index's vectors in clip-retrieval's layout (`clipdex import` reads it back)."""
    from clipdex.indexer.exporter import export_clip_retrieval
    from clipdex.retrieval.store.manifest import read_manifest

    read_manifest(index_dir)
    summary = export_clip_retrieval(index_dir, out_dir, float16=float16)
    if as_json:
        print(json.dumps(summary.to_json()))
    else:
        out.print(  # the command's result, on stdout as `import`'s is; notes and progress go to stderr
            f"exported {summary.images} images and {summary.texts} texts in {summary.partitions} partitions to {out_dir}",
            highlight=False,
            soft_wrap=True,
        )


@app.command(rich_help_panel="Index")
@friendly
def embed(
    paths: PathsArg = None,
    out_url: Annotated[
        str,
        typer.Option(
            "--out", help="A folder or fsspec URL (s3://bucket/prefix, ...) for img_emb/, text_emb/, metadata/."
        ),
    ] = ...,  # type: ignore[assignment]
    texts: TextsOpt = None,
    text_column: TextColumnOpt = None,
    image_column: ImageColumnOpt = None,
    model: ModelAnyOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = Device.auto,
    engine: EngineOption = EngineOpt.local,
    ray_address: RayAddressOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = None,
    partition_rows: Annotated[int, typer.Option(min=1, help="Items per partition (the unit of resuming).")] = 100_000,
    float16: Float16Opt = False,
    exclude: ExcludeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write embeddings in clip-retrieval's layout, without an index; `clipdex import` builds one from them.

    Resumable: re-run the same command to finish partitions a stopped run left, and to add files new since."""
    from clipdex.indexer.embed import EmbedConfig, run_embed
    from clipdex.indexer.engines import EngineConfig

    config = EmbedConfig(
        paths=tuple(paths or ()),
        out=out_url,
        encoder=encoder_config(model, pretrained, device),
        device=device.value,
        texts=tuple(texts or ()),
        text_column=text_column,
        image_column=image_column,
        engine=EngineConfig(engine.value, ray_address, workers),
        batch_size=batch_size,
        partition_rows=partition_rows,
        exclude=tuple(exclude or ()),
        float16=float16,
    )
    summary = run_embed(config)
    if as_json:
        print(json.dumps(summary.to_json(), ensure_ascii=False))
        return
    err.print(
        f"embedded {summary.images} images and {summary.texts} texts into {summary.written} partitions "
        f"({summary.partitions - summary.written} already done) at {out_url}",
        highlight=False,
        soft_wrap=True,
    )
    for path, reason in summary.failures[:20]:
        err.print(f"[yellow]failed[/] {path}: {reason}", highlight=False, soft_wrap=True)


@app.command(rich_help_panel="Index")
@friendly
def reindex(
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    pretrained: Annotated[
        str, typer.Option(help="The new weights (e.g. a `clipdex finetune` checkpoint).", show_default=False)
    ] = ...,  # type: ignore[assignment]
    model: ModelOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    as_json: JsonOpt = False,
) -> None:
    """Re-encode an index with another model in place; searches use the old one until the new one is ready."""
    from clipdex.retrieval.errors import ModelError
    from clipdex.retrieval.model.weights import missing_checkpoint
    from clipdex.retrieval.store.manifest import read_manifest

    read_manifest(index_dir)  # before torch loads: a wrong path is answered at once
    if (why := missing_checkpoint(pretrained)) is not None:
        raise ModelError(why)
    from clipdex.indexer.reindex import reindex as run_reindex

    encoder = encoder_config(model, pretrained, device, index_dir)
    with progress_bar() as bar:
        summary = run_reindex(index_dir, encoder, batch_size=batch_size, workers=workers, progress=RichProgress(bar))
    if as_json:
        print(json.dumps(summary.to_json()))
        return
    what = "kept as they were (the image tower is unchanged)" if summary.images_kept else f"{summary.images} re-encoded"
    out.print(
        f"{index_dir} now uses {summary.model} / {summary.pretrained}: images {what}, {summary.texts} texts re-encoded",
        highlight=False,
        soft_wrap=True,
    )
    if summary.failed:
        err.print(f"[yellow]note:[/] {summary.failed} items could not be re-encoded: `clipdex info --failed`")
