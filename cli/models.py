"""Commands about models: eval (recall@k as CLIP_benchmark computes it)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from clipdex.cli.common import (
    Device,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    PretrainedOpt,
    app,
    encoder_config,
    friendly,
    out,
)
from clipdex.retrieval.errors import ClipdexError


class DatasetOpt(str, Enum):
    flickr30k = "flickr30k"
    coco = "coco"


@app.command("eval")
@friendly
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
        encoder = encoder_config(model, pretrained, device) or EncoderConfig(device=device.value)
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
