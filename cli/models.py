"""Commands about models: eval (recall@k as CLIP_benchmark computes it) and finetune."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clipdex.cli.common import (
    BatchSizeOpt,
    Device,
    DeviceOpt,
    JsonOpt,
    ModelAnyOpt,
    PretrainedOpt,
    TextColumnOpt,
    WorkersOpt,
    app,
    encoder_config,
    err,
    friendly,
    out,
    print_table,
)
from clipdex.retrieval.errors import ClipdexError
from clipdex.retrieval.finetune.config import Method

if TYPE_CHECKING:
    from rich.progress import Progress


class DatasetOpt(str, Enum):
    flickr30k = "flickr30k"
    coco = "coco"


@app.command("eval", rich_help_panel="Models")
@friendly
def eval_(
    dataset: Annotated[
        str,
        typer.Argument(
            help="flickr30k, coco, or your own pairs: a caption file with an image column.", show_default=False
        ),
    ],
    root: Annotated[
        Path | None, typer.Option(help="Benchmark folder (layouts: data/README.md).", show_default=False)
    ] = None,
    text_column: Annotated[
        str | None, typer.Option(help="Pairs file: text column (default: caption, then text).")
    ] = None,
    image_column: Annotated[str | None, typer.Option(help="Pairs file: image column (default: image).")] = None,
    split: Annotated[str, typer.Option(help="Karpathy split: train, val or test.")] = "test",
    model: ModelAnyOpt = None,
    pretrained: PretrainedOpt = None,
    index_dir: Annotated[
        Path | None, typer.Option("--index", "-i", help="Evaluate the model this index was built with.")
    ] = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N images (a quick run).")] = None,
    rerank: Annotated[
        Path | None,
        typer.Option(
            help="A re-ranking head (`finetune --method rerank`): also report recall with it.", show_default=False
        ),
    ] = None,
    rerank_k: Annotated[int, typer.Option(min=1, help="Contrastive candidates the head re-scores per query.")] = 16,
    as_json: JsonOpt = False,
) -> None:
    """Measure text→image and image→text recall@1/5/10 exactly as CLIP_benchmark does, on a benchmark or your pairs."""
    from clipdex.retrieval.evaluation.datasets import DatasetName

    names = [d.value for d in DatasetName]
    benchmark = dataset if dataset in names else None
    if benchmark is None and not Path(dataset).exists():
        import difflib

        close = difflib.get_close_matches(dataset.lower(), names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ClipdexError(
            f"{dataset} is neither a benchmark ({', '.join(names)}) nor a caption file of your pairs: {hint}"
            "a pairs file is a CSV, TSV, JSON lines or Parquet file with an image and a caption column"
        )
    if benchmark is not None and root is None:
        raise ClipdexError(f"{benchmark} needs --root DIR: the folder holding it (layouts: data/README.md)")
    if rerank is not None and not rerank.is_file():
        raise ClipdexError(f"re-ranking head not found: {rerank}")
    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.evaluation.evaluate import EvalConfig, evaluate
    from clipdex.retrieval.imaging.loader import default_workers
    from clipdex.retrieval.model.weights import index_encoder_config

    if index_dir is not None:
        if model or pretrained:
            raise ClipdexError("give either --index or --model/--pretrained, not both")
        encoder, _ = index_encoder_config(index_dir, device=device.value)
    else:
        encoder = encoder_config(model, pretrained, device) or EncoderConfig(device=device.value)
    config = EvalConfig(
        dataset=DatasetName(benchmark) if benchmark else None,
        root=root,
        pairs=None if benchmark else Path(dataset),
        text_column=text_column,
        image_column=image_column,
        encoder=encoder,
        split=split,
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
        limit=limit,
    )
    if rerank is None:
        result = evaluate(config)
    else:
        from clipdex.retrieval.search.rerank import evaluate_reranked

        result = evaluate_reranked(config, rerank, rerank_k)
    if as_json:
        print(json.dumps(result))
        return
    from rich.table import Table

    table = Table(
        title=f"{result['dataset']} {result['split']}: {result['model']} / {result['pretrained']} "
        f"({result['images']} images, {result['texts']} texts)"
    )
    table.add_column("direction")
    for k in result["text_to_image"]:
        table.add_column(k, justify="right")
    for key, label in (("text_to_image", "text → image"), ("image_to_text", "image → text")):
        table.add_row(label, *(f"{v:.4f}" for v in result[key].values()))  # as in --json: fractions
        if "reranked" in result:
            k = result["reranked"]["k"]
            table.add_row(f"{label}, re-ranked top-{k}", *(f"{v:.4f}" for v in result["reranked"][key].values()))
    print_table(table)
    out.print(f"{result['images_per_s']:.1f} images/s, {result['texts_per_s']:.1f} texts/s")


class _TrainBar:
    """A rich progress bar per epoch, with loss, learning rate and pairs/s; plain lines when piped."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task: Any = None

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, visible=True)
        self.task = self.bar.add_task(f"epoch {epoch}/{epochs}", total=steps, loss=float("nan"), lr=0.0, speed=0.0)

    def step(self, step: Any) -> None:
        self.bar.update(self.task, advance=1, loss=step.loss, lr=step.lr, speed=step.pairs_per_s)

    def note(self, message: str) -> None:
        err.print(f"[yellow]note:[/] {message}", highlight=False, soft_wrap=True)


def _train_bar() -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.2e}  {task.fields[speed]:.0f} pairs/s"),
        TimeElapsedColumn(),
        console=err.console,
        disable=not err.is_terminal,
    )


@app.command(rich_help_panel="Models")
@friendly
def finetune(
    pairs: Annotated[
        Path | None,
        typer.Argument(help="Caption file with an image column (.csv .tsv .jsonl .parquet).", show_default=False),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the checkpoint, log, report and plot.")
    ] = ...,  # type: ignore[assignment]
    model: ModelAnyOpt = None,
    pretrained: PretrainedOpt = None,
    dataset: Annotated[
        DatasetOpt | None, typer.Option(help="Train on a benchmark's Karpathy train split instead (needs --root).")
    ] = None,
    root: Annotated[Path | None, typer.Option(help="Dataset folder for --dataset (data/README.md).")] = None,
    method: Annotated[
        Method,
        typer.Option(
            help="Which weights train: all (full), the last N blocks, LoRA adapters, the text tower (lit), or a "
            "re-ranking head over the frozen model (rerank)."
        ),
    ] = Method.FULL,
    layers: Annotated[int | None, typer.Option(help="last-n: blocks of each tower to train.")] = None,
    rank: Annotated[int, typer.Option(min=1, help="lora: adapter rank.")] = 8,
    val: Annotated[
        Path | None, typer.Option(help="Validation pairs (default: a held-out share of the images).")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of images held out for validation.")] = 0.1,
    keep: Annotated[
        Path | None, typer.Option(help="A general pairs file measured before and after (forgetting).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, show_default="5; rerank 80")] = None,
    batch_size: Annotated[int, typer.Option(min=2, help="Pairs per contrastive batch.")] = 64,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate (default: 1e-5; lora 1e-4; rerank 2e-3).")
    ] = None,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 0.1,
    accum_freq: Annotated[
        int, typer.Option(min=1, help="Micro-batches per step (feature-cached: the batch is accum-freq x larger).")
    ] = 1,
    grad_checkpointing: Annotated[bool, typer.Option(help="Trade compute for memory.")] = False,
    patience: Annotated[int | None, typer.Option(min=1, help="Stop after N epochs without better recall.")] = None,
    wise: Annotated[
        float | None, typer.Option(help="WiSE-FT: interpolate tuned and starting weights (1 = tuned, 0 = start).")
    ] = None,
    hard_negatives: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Make each batch of groups of G images the starting model finds similar (mined hard negatives, "
            "NegCLIP-style batches); contrastive methods.",
            metavar="G",
        ),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    text_column: TextColumnOpt = None,
    image_column: Annotated[str | None, typer.Option(help="Image column (default: image).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out from its last epoch.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier run in --out (refused without it).")] = False,
    index_dir: Annotated[
        Path | None,
        typer.Option(
            "--index",
            "-i",
            help="rerank: attach the head to this index, whose model it trains over (without --model/--pretrained, "
            "the index's own); `clipdex search --rerank` then uses it.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a CLIP model on your own image–caption pairs; report validation recall before and after."""
    from clipdex.retrieval.finetune.config import check_config, check_out

    check_out(out_dir, resume=resume, overwrite=overwrite)  # before torch loads
    if index_dir is not None:
        if method is not Method.RERANK:
            raise ClipdexError("--index attaches a re-ranking head to an index: use it with --method rerank")
        from clipdex.retrieval.store.manifest import read_manifest

        read_manifest(index_dir)  # a missing or damaged index is said before anything trains
        if model is None and pretrained is None:
            from clipdex.retrieval.model.weights import index_encoder_config

            own = index_encoder_config(index_dir)[0]
            model, pretrained = own.model, own.pretrained
    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.evaluation.datasets import DatasetName
    from clipdex.retrieval.finetune import FinetuneConfig
    from clipdex.retrieval.imaging.loader import default_workers

    config = FinetuneConfig(
        out=out_dir,
        encoder=encoder_config(model, pretrained, device) or EncoderConfig(device=device.value),
        pairs=pairs,
        dataset=DatasetName(dataset.value) if dataset else None,
        root=root,
        text_column=text_column,
        image_column=image_column,
        val=val,
        val_fraction=val_fraction,
        keep=keep,
        method=method,
        layers=layers,
        rank=rank,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        accum_freq=accum_freq,
        grad_checkpointing=grad_checkpointing,
        patience=patience,
        wise=wise,
        hard_negatives=hard_negatives,
        seed=seed,
        workers=default_workers() if workers is None else workers,
        resume=resume,
        overwrite=overwrite,
    )
    check_config(config)  # before torch loads
    from clipdex.retrieval.finetune.run import finetune

    with _train_bar() as bar:
        result = finetune(config, progress=_TrainBar(bar))
    if index_dir is not None:
        from clipdex.retrieval.store.heads import attach_head

        result.details["index"] = str(attach_head(index_dir, result.checkpoint))
    if as_json:
        print(json.dumps(result.to_json()))
        return
    out.print(
        f"{result.method.value}: {result.epochs} epochs on {result.train_pairs} pairs; kept epoch {result.best_epoch}",
        highlight=False,
    )
    from rich.table import Table

    table = Table(title=f"validation recall ({result.val_pairs} pairs)")
    table.add_column("")
    for k in result.before["text_to_image"]:
        table.add_column(k, justify="right")
    for key, label in (("text_to_image", "text → image"), ("image_to_text", "image → text")):
        table.add_row(f"{label}, before", *(f"{v:.4f}" for v in result.before[key].values()))
        table.add_row(f"{label}, after", *(f"{v:.4f}" for v in result.after[key].values()))
    print_table(table)
    if result.method.value == "rerank":
        out.print(f"re-ranking head: {result.checkpoint} (after: its top-{result.details['rerank_k']} re-scored)",
                  highlight=False, soft_wrap=True)  # fmt: skip
        if index_dir is not None:
            out.print(f"attached to {index_dir}: search it with --rerank", highlight=False, soft_wrap=True)
    else:
        out.print(f"checkpoint: {result.checkpoint}", highlight=False, soft_wrap=True)
        out.print(
            f"use it: --model {result.details['model']} --pretrained {result.checkpoint}",
            highlight=False,
            soft_wrap=True,
        )
    out.print(f"report: {result.details['report']}  plot: {result.details['plot']}", highlight=False, soft_wrap=True)
