"""The command that keeps an index current with its folders: watch (and the watcher `serve --watch` runs)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from clipdex.cli.common import (
    BatchSizeOpt,
    Device,
    DeviceOpt,
    ExcludeOpt,
    IndexDir,
    ModelOpt,
    OcrOpt,
    PathsArg,
    PretrainedOpt,
    RuntimeOpt,
    WorkersOpt,
    app,
    encoder_config,
    err,
    friendly,
)
from clipdex.retrieval.errors import InputError
from clipdex.retrieval.signals import term_as_interrupt

PollOpt = Annotated[
    bool | None,
    typer.Option(
        "--poll/--events",
        help="Poll the folders for changes, or listen for the system's events (default: poll network and FUSE "
        "mounts, which send no events, listen elsewhere).",
        show_default=False,
    ),
]
SettleOpt = Annotated[
    float,
    typer.Option(min=0, help="Index a file once it has not changed for this many seconds (a copy is whole)."),
]


@app.command(rich_help_panel="Index")
@friendly
def watch(
    paths: PathsArg = None,
    index_dir: IndexDir = ...,  # type: ignore[assignment]
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    runtime: RuntimeOpt = None,
    exclude: ExcludeOpt = None,
    poll: PollOpt = None,
    settle: SettleOpt = 2.0,
    ocr: OcrOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each run's result as one JSON line.")] = False,
) -> None:
    """Keep the index current: index the folders now, then again whenever files in them are added, changed,
    renamed or deleted, until Ctrl-C. Without folders, the ones the index already holds are watched.

    Changes are gathered into a few ordinary runs (the same as `clipdex index`); a file still being copied waits
    until it is whole, and a folder that goes away (an unplugged drive) keeps its items offline."""
    from clipdex.indexer.watch import Watcher

    config = watch_config(
        index_dir,
        paths,
        encoder=encoder_config(model, pretrained, device, index_dir),
        device=device.value,
        runtime=runtime.value if runtime else None,
        batch_size=batch_size,
        workers=workers,
        exclude=tuple(exclude or ()),
        ocr=ocr,
        poll=poll,
        settle_s=settle,
    )
    watcher = Watcher(config, on_run=lambda summary, seconds: said(summary, seconds, as_json))
    how = {True: "polling", False: "listening for changes", None: "listening for changes (polling network mounts)"}
    err.print(
        f"clipdex: watching {', '.join(str(p) for p in config.index.paths)} for {index_dir}, {how[poll]} "
        "(Ctrl-C to stop)",
        highlight=False,
        soft_wrap=True,
    )
    try:
        with term_as_interrupt():
            watcher.run()
    except KeyboardInterrupt:
        err.print("clipdex: stopped watching", highlight=False)


def watch_config(index_dir: Path, paths: list[Path] | None, **options: Any) -> Any:
    """What a watcher watches: the folders given, else the folders the index holds (said when there are none)."""
    from clipdex.indexer.config import IndexConfig
    from clipdex.indexer.watch import WatchConfig

    poll = options.pop("poll", None)
    settle_s = options.pop("settle_s", 2.0)
    roots = [Path(p) for p in paths] if paths else _held_roots(index_dir)
    index = IndexConfig(paths=tuple(roots), index_dir=index_dir, **options)
    return WatchConfig(index=index, poll=poll, settle_s=settle_s)


def _held_roots(index_dir: Path) -> list[Path]:
    from clipdex.retrieval.imaging.files import is_image_file
    from clipdex.retrieval.store.manifest import MANIFEST, read_manifest

    if not (index_dir / MANIFEST).exists():
        raise InputError(f"{index_dir} is not an index yet: name the folders to watch, e.g. clipdex watch ~/Photos "
                         f"--index {index_dir}")  # fmt: skip
    roots = [Path(r) for r in read_manifest(index_dir).roots if not is_image_file(Path(r))]
    if not roots:
        raise InputError(f"{index_dir} holds no folders to watch: name them, e.g. clipdex watch ~/Photos --index "
                         f"{index_dir}")  # fmt: skip
    return roots


def said(summary: Any, seconds: float, as_json: bool) -> None:
    """One line a run: what changed and how long it took."""
    if as_json:
        data = {**summary.to_json(), "deferred": summary.deferred, "seconds": round(seconds, 3)}
        data["failures"] = [{"path": path, "error": reason} for path, reason in summary.failures]
        print(json.dumps(data, ensure_ascii=False), flush=True)
        return
    if not (summary.added or summary.updated or summary.removed or summary.failed):
        return
    parts = [f"{n} {what}" for n, what in ((summary.added, "added"), (summary.updated, "updated"),
                                           (summary.removed, "removed"), (summary.failed, "failed")) if n]  # fmt: skip
    err.print(f"{time.strftime('%H:%M:%S')} {', '.join(parts)} ({seconds:.1f} s)", highlight=False, soft_wrap=True)
    for path, reason in summary.failures[:20]:
        err.print(f"[yellow]failed[/] {path}: {reason}", highlight=False, soft_wrap=True)
    for note in summary.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
