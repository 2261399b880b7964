"""What every clipdex command shares: the app, one-line errors, option types, progress, output helpers."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer
from typer.core import TyperArgument, TyperGroup

from clipdex.retrieval.errors import ClipdexError, disk_error
from clipdex.retrieval.search.request import DEFAULT_RERANK_K

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

_METAVARS = {"int": "N", "float": "NUMBER", "path": "PATH"}  # by click type name; anything else is TEXT


def _metavar(param: Any) -> str:
    """A plain metavar for --help: `N`, `PATH`, `auto|cpu|cuda`, `PATHS` for an argument, nothing for a flag; not
    typer's `INT RANGE` or `[auto|cpu|cuda]`."""
    if param.metavar is not None:
        return str(param.metavar)
    if getattr(param, "is_flag", False):
        return ""
    if isinstance(param, TyperArgument):
        return str(param.name).upper()  # the usage line adds `...` to one that repeats
    kind = param.type
    choices = getattr(kind, "choices", None)
    if choices:
        return "|".join(str(getattr(c, "value", c)) for c in choices)
    name = str(getattr(kind, "name", "")).split(" ")[0]  # click's names: int, int range, float, path, str
    return _METAVARS.get(name, "TEXT")


def _untyped(kind: Any) -> Any:
    """A copy of an argument's click type that names no type in --help: the argument's metavar (`PATHS`) says it
    all, without a second, typer-style `<path>` column."""
    plain = copy.copy(kind)
    plain.get_metavar = lambda param, ctx: ""
    return plain


# Options whose value may be left out (`--rerank` or `--rerank 32`), with the value they take then. typer has no such
# options, so the command line is completed before it is parsed: the default goes in where no number follows.
OPTIONAL_VALUES: dict[str, dict[str, str]] = {"search": {"--rerank": str(DEFAULT_RERANK_K)}}


def _fill_optional_values(
    parse_args: Callable[[Any, list[str]], Any], optional: dict[str, str]
) -> Callable[[Any, list[str]], Any]:
    def parse(ctx: Any, args: list[str]) -> Any:
        filled: list[str] = []
        for i, arg in enumerate(args):
            filled.append(arg)
            if arg == "--":
                filled.extend(args[i + 1 :])
                break
            if arg in optional and not (i + 1 < len(args) and args[i + 1].lstrip("-").isdigit()):
                filled.append(optional[arg])
        return parse_args(ctx, filled)

    return parse


def _plain_help(get_help_option: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """--help shown as the flag it is, without typer's `<bool>`."""

    def get(ctx: Any) -> Any:
        option = get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return get


class _Group(TyperGroup):
    """The app's command group: every command's parameters get plain metavars (see _metavar)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in [self, *self.commands.values()]:
            command.get_help_option = _plain_help(command.get_help_option)  # type: ignore[method-assign,assignment]
            if command.name in OPTIONAL_VALUES:
                optional = OPTIONAL_VALUES[command.name]
                command.parse_args = _fill_optional_values(command.parse_args, optional)  # type: ignore[method-assign,assignment]
            for param in command.params:
                param.metavar = _metavar(param)
                if isinstance(param, TyperArgument):
                    param.type = _untyped(param.type)


app = typer.Typer(
    cls=_Group,
    name="clipdex",
    help="Cross-modal image–text search: index photos and captions with CLIP, search them in milliseconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class LazyConsole:
    """rich's Console, made when first used: importing rich takes 0.04 s, which a command printing JSON (a search
    asked for `--json`, as scripts and the server's clients ask) never needs. Anything asked of it is the Console's."""

    def __init__(self, *, stderr: bool = False):
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


out = LazyConsole()
err = LazyConsole(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn user errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClipdexError as e:
            _say(e)
            raise typer.Exit(e.exit_code) from None
        except Exception as e:  # a full, read-only or failing disk, whichever library met it
            said = disk_error(e, _written_folder(kwargs))
            if said is None:
                raise
            _say(said)
            raise typer.Exit(said.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _written_folder(kwargs: dict[str, Any]) -> Path | None:
    """The folder a command writes (its --out, else its --index): named when a disk error names no file."""
    for name in ("out_dir", "out_url", "index_dir"):
        where = kwargs.get(name)
        if isinstance(where, Path) or (isinstance(where, str) and "://" not in where):
            return Path(where)
    return None


def _say(e: ClipdexError) -> None:
    """The error's one line on stderr; when stderr itself cannot be written (a failing disk under a redirect), the
    exit code says it alone, rather than a traceback about the line."""
    with contextlib.suppress(OSError):
        try:
            console = err.console
        except Exception:  # rich could not be imported now (its files on the failing disk): the same line, plain
            print(f"error: {e}", file=sys.stderr)
            return
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


TargetOpt = Annotated[Literal["images", "texts"], typer.Option(help="Search images or texts.")]


IndexDir = Annotated[
    Path,
    typer.Option(
        "--index", "-i", envvar="CLIPDEX_INDEX", help="Index directory ($CLIPDEX_INDEX by default).", show_default=False
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="open_clip architecture (e.g. ViT-B-32), hf-hub:org/repo, or a model-config JSON file. "
        "Default: ViT-B-32 for a new index, the index's own model otherwise."
    ),
]
ModelAnyOpt = Annotated[  # where no index is made or updated: embed, eval, finetune
    str | None,
    typer.Option(
        "--model",
        help="open_clip architecture (e.g. ViT-B-32), hf-hub:org/repo, or a model-config JSON file (default: ViT-B-32).",
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
MemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="Memory budget for each ANN index, e.g. 4G (default: none); with --on-disk, what the build may hold."
    ),
]
OnDiskOpt = Annotated[
    bool,
    typer.Option(
        "--on-disk",
        help="Keep the inverted lists on disk, memory-mapped (for more vectors than fit in RAM); "
        "build within --memory (default 1G).",
    ),
]
TargetRecallOpt = Annotated[
    float | None, typer.Option(min=0.0, max=1.0, help="Recall@10 against exact search to tune for (default 0.95).")
]


def ann_settings(
    index_type: str | None,
    memory: str | None,
    target_recall: float | None,
    *,
    keep_default: bool,
    on_disk: bool = False,
) -> Any:
    from clipdex.retrieval.config import parse_memory
    from clipdex.retrieval.store.manifest import DEFAULT_TARGET_RECALL, AnnSettings

    if keep_default and index_type is None and memory is None and target_recall is None and not on_disk:
        return None
    try:
        budget = parse_memory(memory) if memory else None
    except ValueError as e:
        raise ClipdexError(str(e)) from None
    # --index-type is checked by the library at the index's own dimension
    return AnnSettings(
        index_type, budget, DEFAULT_TARGET_RECALL if target_recall is None else target_recall, on_disk=on_disk
    )


DeviceOpt = Annotated[Device, typer.Option(help="Where to run the model.")]


class Runtime(str, Enum):
    auto = "auto"
    onnx = "onnx"
    torch = "torch"


class Precision(str, Enum):
    fp32 = "fp32"
    int8 = "int8"


PrecisionOpt = Annotated[
    Precision | None,
    typer.Option(
        help="What the model computes in, recorded in the index (queries use the same): fp32, or int8 (weights "
        "quantised on ONNX Runtime: faster, smaller, vectors within cosine 0.99 of fp32's; see benchmarks/RESULTS.md). "
        "An existing index keeps its own.",
        show_default="fp32",
    ),
]


OcrOpt = Annotated[
    bool | None,
    typer.Option(
        "--ocr/--no-ocr",
        help="Read the words in images (signs, receipts, screenshots: RapidOCR, offline) so that searches find them; "
        "the index remembers it for later runs and `watch`. --no-ocr stops reading new images.",
        show_default="as the index does (off for a new one)",
    ),
]
RuntimeOpt = Annotated[
    Runtime | None,
    typer.Option(
        envvar="CLIPDEX_RUNTIME",
        help="What runs the model: onnx (its export on ONNX Runtime, no torch), torch, or auto (onnx where the "
        "export agrees with torch, on the CPU).",
        show_default="auto",
    ),
]
PathsArg = Annotated[
    list[Path] | None, typer.Argument(help="Folders (walked recursively) and image files.", show_default=False)
]
TextsOpt = Annotated[
    list[Path] | None, typer.Option(help="Caption file: .txt, .csv, .tsv, .jsonl or .parquet (repeatable).")
]
TextColumnOpt = Annotated[str | None, typer.Option(help="Text column (default: caption, then text).")]
ImageColumnOpt = Annotated[
    str | None, typer.Option(help="Column of image paths, relative to the caption file (default: image).")
]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Images per encoder batch.")]
WorkersOpt = Annotated[int | None, typer.Option(min=0, help="Decode worker processes (default: cores - 1).")]
Float16Opt = Annotated[bool, typer.Option(help="Write vectors as float16 (half the size, 1e-3 precision).")]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Skip files and folders matching this glob (repeatable; relative to each folder given).",
        show_default=False,
    ),
]


class RichProgress:
    def __init__(self, progress: Progress):
        self._progress = progress
        self._task: Any = None

    def start(self, what: str, total: int | None) -> None:
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(what, total=total)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)


def progress_bar() -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err.console,
        disable=not err.is_terminal,
        transient=False,
    )


def encoder_config(model: str | None, pretrained: str | None, device: Device, index_dir: Path | None = None) -> Any:
    """The model the user named; --pretrained alone names weights for the index's own architecture (or the
    default one for a new index)."""
    from clipdex.retrieval.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, EncoderConfig
    from clipdex.retrieval.store.manifest import MANIFEST, index_model

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


def lean_model_imports(spec: Any) -> None:
    """Keep open_clip from importing optional packages (transformers, timm) that the model `spec` (an index's
    `ModelSpec`) does not use: they cost about a second of every `clipdex search`. Process-wide, so only for
    commands that load one model."""
    import sys

    from clipdex.retrieval.config import OPTIONAL_MODEL_IMPORTS, optional_imports_needed

    if "open_clip" in sys.modules:
        return  # too late to matter, and someone else may rely on them
    unneeded = set(OPTIONAL_MODEL_IMPORTS) - optional_imports_needed(spec)
    for name in unneeded:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # `import name` now raises ImportError


def version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"clipdex {version('clipdex')}", highlight=False)
        raise typer.Exit()


class EngineOpt(str, Enum):
    local = "local"
    ray = "ray"


EngineOption = Annotated[
    EngineOpt,
    typer.Option(
        help='Where decoding and encoding run: here, or on a Ray cluster through Ray Data (pip install "clipdex\\[ray]").'
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        help="With --engine ray: the cluster to join (auto, or host:port); default: start a local Ray.",
        show_default=False,
    ),
]


def print_table(table: Table) -> None:
    """A table on a terminal; piped, tab-separated lines (the header first, when the table has one) with nothing
    wrapped, cut or boxed, for `cut`, `awk` and spreadsheets."""
    if out.is_terminal:
        out.print(table)
        return
    if table.show_header:
        print("\t".join(_plain(c.header) for c in table.columns))
    for row in zip(*(c.cells for c in table.columns), strict=True):
        print("\t".join(_plain(cell) for cell in row))


def _plain(cell: Any) -> str:
    """A cell's text without rich markup or styles."""
    from rich.text import Text

    if isinstance(cell, Text):
        return cell.plain
    return Text.from_markup(str(cell)).plain if isinstance(cell, str) else str(cell)


def print_ann(manifest: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ann": manifest.to_json()["ann"], "counts": manifest.counts}))
        return
    from rich.table import Table

    table = Table(title="ANN indexes", show_header=True)
    for col in ("kind", "vectors", "index", "params", "recall@10", "why"):
        table.add_column(col)
    for kind, record in manifest.ann.items():
        recall = record.recall_at_10
        table.add_row(
            kind,
            str(record.n),
            record.factory,
            record.params or "-",
            "-" if recall is None else f"{recall:.3f}",
            record.reason,
        )
    print_table(table)
