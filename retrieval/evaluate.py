"""Zero-shot retrieval evaluation on Flickr30k / COCO through clipdex's own encode path."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipdex.retrieval.config import EncoderConfig
from clipdex.retrieval.datasets import DatasetName, load_dataset
from clipdex.retrieval.encoder import Encoder, load_encoder
from clipdex.retrieval.errors import DatasetError
from clipdex.retrieval.imaging import DecodeOptions
from clipdex.retrieval.metrics import recall_at_k

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    dataset: DatasetName
    root: Path
    encoder: EncoderConfig
    split: str = "test"
    batch_size: int = 64
    workers: int = 0
    limit: int | None = None
    ks: tuple[int, ...] = (1, 5, 10)


def evaluate(config: EvalConfig, *, encoder: Encoder | None = None) -> dict[str, Any]:
    """Recall@k in both directions, plus encode throughput; keys as `clipdex eval --json` prints them."""
    ds = load_dataset(config.dataset, config.root, split=config.split, limit=config.limit)
    encoder = encoder or load_encoder(config.encoder)
    start = time.perf_counter()
    image_emb = encode_image_files(encoder, ds.images, batch_size=config.batch_size, workers=config.workers)
    image_s = time.perf_counter() - start
    texts, owner = ds.texts()
    start = time.perf_counter()
    text_emb = encoder.encode_texts(texts, batch_size=max(config.batch_size, 256))
    text_s = time.perf_counter() - start
    recalls = recall_at_k(text_emb, image_emb, np.asarray(owner), config.ks)
    return {
        "dataset": ds.name,
        "split": ds.split,
        "model": encoder.spec.name,
        "pretrained": encoder.spec.pretrained,
        "images": len(ds.images),
        "texts": len(texts),
        **recalls,
        "images_per_s": len(ds.images) / image_s if image_s > 0 else None,
        "texts_per_s": len(texts) / text_s if text_s > 0 else None,
    }


def encode_image_files(encoder: Encoder, paths: list[Path], *, batch_size: int, workers: int) -> np.ndarray:
    """Decode (without EXIF rotation, as the benchmark protocol does) and encode, in file order."""
    from clipdex.indexer.decode import ImageFiles, iter_decoded

    dataset = ImageFiles(paths, encoder.preprocess, options=DecodeOptions(max_pixels=1 << 62, exif_transpose=False))
    out = np.empty((len(paths), encoder.dim), dtype=np.float32)
    for batch in iter_decoded(dataset, batch_size=batch_size, workers=min(workers, len(paths))):
        for d in batch:
            if d.error is not None:
                raise DatasetError(f"cannot use {paths[d.index]}: {d.error}")
        pixels = torch.stack([d.pixels for d in batch if d.pixels is not None])
        out[[d.index for d in batch]] = encoder.encode_images(pixels)
    return out
