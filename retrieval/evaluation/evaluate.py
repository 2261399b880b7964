"""Zero-shot retrieval evaluation on Flickr30k / COCO through clipdex's own encode path."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipdex.retrieval.config import EncoderConfig
from clipdex.retrieval.errors import DatasetError, InputError
from clipdex.retrieval.evaluation.datasets import DatasetName, RetrievalDataset, Skipped, load_dataset, read_pairs
from clipdex.retrieval.evaluation.metrics import recall_at_k
from clipdex.retrieval.imaging.decode import DecodeOptions
from clipdex.retrieval.model.encoder import Encoder, load_encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    encoder: EncoderConfig
    dataset: DatasetName | None = None  # a benchmark under `root`, or:
    root: Path | None = None
    pairs: Path | None = None  # your own image–caption pairs (a caption file with an image column)
    text_column: str | None = None
    image_column: str | None = None
    split: str = "test"
    batch_size: int = 64
    workers: int = 0
    limit: int | None = None
    ks: tuple[int, ...] = (1, 5, 10)


def evaluate(
    config: EvalConfig,
    *,
    encoder: Encoder | None = None,
    measure: Callable[[RetrievalDataset, DecodeOptions], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Recall@k in both directions, plus encode throughput; keys as `clipdex eval --json` prints them. `measure`
    adds its own keys, computed on the same dataset as decoded here (the re-ranker's recall: search/rerank.py).

    Benchmarks are decoded as their reference loaders decode them (no EXIF rotation); your own pairs as indexing
    decodes your photos, and pairs whose image cannot be read are left out and listed under `skipped`."""
    encoder = encoder or load_encoder(config.encoder)
    extra: dict[str, Any] = {}
    if config.pairs is not None:
        skipped = Skipped()
        ds = read_pairs(config.pairs, text_column=config.text_column, image_column=config.image_column, skipped=skipped)
        options = encoder.decode_options()
        ds = keep_decodable(ds, options, config.workers, skipped)
        if config.limit is not None:
            ds = ds.head(config.limit)
        if not ds.images:
            raise InputError(f"no usable image–caption pairs in {config.pairs}")
        extra["skipped"] = [{"what": w, "why": y} for w, y in skipped.items]
    elif config.dataset is not None and config.root is not None:
        ds = load_dataset(config.dataset, config.root, split=config.split, limit=config.limit)
        options = BENCHMARK_DECODE
    else:
        raise InputError("evaluate needs a benchmark (flickr30k or coco with --root) or a pairs file")
    timed = dataset_recall(
        encoder, ds, batch_size=config.batch_size, workers=config.workers, ks=config.ks, options=options
    )
    if measure is not None:
        extra.update(measure(ds, options))
    return {
        "dataset": ds.name,
        "split": ds.split,
        "model": encoder.spec.name,
        "pretrained": encoder.spec.pretrained,
        "images": len(ds.images),
        "texts": ds.n_texts,
        **timed.recalls,
        "images_per_s": len(ds.images) / timed.image_s if timed.image_s > 0 else None,
        "texts_per_s": ds.n_texts / timed.text_s if timed.text_s > 0 else None,
        **extra,
    }


BENCHMARK_DECODE = DecodeOptions(max_pixels=1 << 62, exif_transpose=False)  # the benchmark loaders ignore EXIF


@dataclass(frozen=True)
class TimedRecall:
    recalls: dict[str, dict[str, float]]
    image_s: float
    text_s: float


def dataset_recall(
    encoder: Encoder,
    ds: RetrievalDataset,
    *,
    batch_size: int = 64,
    workers: int = 0,
    ks: tuple[int, ...] = (1, 5, 10),
    options: DecodeOptions = BENCHMARK_DECODE,
) -> TimedRecall:
    """Recall@k of `encoder` on a dataset of images and their captions, as CLIP_benchmark computes it."""
    start = time.perf_counter()
    image_emb = encode_image_files(encoder, ds.images, batch_size=batch_size, workers=workers, options=options)
    image_s = time.perf_counter() - start
    texts, owner = ds.texts()
    start = time.perf_counter()
    text_emb = encoder.encode_texts(texts, batch_size=max(batch_size, 256))
    text_s = time.perf_counter() - start
    return TimedRecall(recall_at_k(text_emb, image_emb, np.asarray(owner), ks), image_s, text_s)


def keep_decodable(ds: RetrievalDataset, options: DecodeOptions, workers: int, skipped: Skipped) -> RetrievalDataset:
    """The dataset without the images that cannot be decoded (as indexing would decode them); those are added
    to `skipped` with the reason."""
    from clipdex.retrieval.imaging.loader import ImageFiles, iter_decoded

    ok = [True] * len(ds.images)
    files = ImageFiles(ds.images, _decode_only, options=options)
    for batch in iter_decoded(files, batch_size=64, workers=min(workers, len(ds.images))):
        for d in batch:
            if d.error is not None:
                ok[d.index] = False
                skipped.add(str(ds.images[d.index]), d.error)
    return ds.subset(i for i, good in enumerate(ok) if good)


def _decode_only(image: Any) -> torch.Tensor:
    return torch.zeros(0)


def encode_image_files(
    encoder: Encoder,
    paths: list[Path],
    *,
    batch_size: int,
    workers: int,
    options: DecodeOptions = BENCHMARK_DECODE,
) -> np.ndarray:
    """Decode (by default without EXIF rotation, as the benchmark protocol does) and encode, in file order."""
    from clipdex.retrieval.imaging.loader import ImageFiles, iter_decoded

    dataset = ImageFiles(paths, encoder.preprocess, options=options)
    out = np.empty((len(paths), encoder.dim), dtype=np.float32)
    for batch in iter_decoded(dataset, batch_size=batch_size, workers=min(workers, len(paths))):
        for d in batch:
            if d.error is not None:
                raise DatasetError(f"cannot use {paths[d.index]}: {d.error}")
        out[[d.index for d in batch]] = encoder.encode_pixels([d.pixels for d in batch if d.pixels is not None])
    return out
