"""The data of a fine-tuning run: pairs read and checked, split by image, and each epoch's batches decoded with
the training augmentation in the indexer's workers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipdex.retrieval.errors import InputError
from clipdex.retrieval.evaluation.datasets import RetrievalDataset, Skipped, load_dataset, read_pairs
from clipdex.retrieval.evaluation.evaluate import BENCHMARK_DECODE, keep_decodable
from clipdex.retrieval.finetune.config import FinetuneConfig
from clipdex.retrieval.finetune.pairs import epoch_batches, nearest_images, split_by_image
from clipdex.retrieval.imaging.decode import DecodeOptions
from clipdex.retrieval.model.encoder import LoadedModel


@dataclass
class Data:
    """The pairs to train on, validate on, and (optionally) measure forgetting on, as they will be decoded."""

    train: RetrievalDataset
    val: RetrievalDataset
    keep: RetrievalDataset | None
    options: DecodeOptions
    skipped: Skipped
    neighbours: np.ndarray | None = None  # with --hard-negatives: each training image's nearest (pairs.nearest_images)


def read_data(config: FinetuneConfig, loaded: LoadedModel, note: Callable[[str], None]) -> Data:
    """Read and check the pairs; unreadable images are left out (and listed), validation is split by image."""
    skipped = Skipped()
    if config.dataset is not None:
        assert config.root is not None
        options = BENCHMARK_DECODE  # as `clipdex eval` decodes these datasets
        train = load_dataset(config.dataset, config.root, split="train")
        val = None if config.val else load_dataset(config.dataset, config.root, split="val")
    else:
        assert config.pairs is not None
        options = loaded.encoder().decode_options()  # as indexing decodes the user's images
        train = read_pairs(
            config.pairs, text_column=config.text_column, image_column=config.image_column, skipped=skipped
        )
        val = None
    if config.val is not None:
        val = read_pairs(config.val, text_column=config.text_column, image_column=config.image_column, skipped=skipped)
    keep = None
    if config.keep is not None:
        keep = read_pairs(
            config.keep, text_column=config.text_column, image_column=config.image_column, skipped=skipped
        )
    train = keep_decodable(train, options, config.workers, skipped)
    if val is None:
        train, val = split_by_image(train, config.val_fraction, config.seed)
    else:
        val = keep_decodable(val, options, config.workers, skipped)
        shared = set(val.images)
        if shared & set(train.images):
            note(
                f"{len(shared & set(train.images))} validation images are also in the training pairs: left out of training"
            )
            train = train.subset(i for i, p in enumerate(train.images) if p not in shared)
    if keep is not None:
        keep = keep_decodable(keep, options, config.workers, skipped)
    if len(train.images) < 2 or not val.images:
        raise InputError(
            f"{len(train.images)} training and {len(val.images)} validation images are usable: too few to train "
            "and measure (a contrastive batch needs two pairs)"
        )
    if skipped.items:
        what, why = skipped.items[0]
        note(f"left out {len(skipped.items)} pairs or images that cannot be used (e.g. {what}: {why})")
    return Data(train, val, keep, options, skipped)


def mine_neighbours(config: FinetuneConfig, data: Data, loaded: LoadedModel, batch_size: int) -> None:
    """With --hard-negatives: the training images' nearest images by the starting model's embeddings, once."""
    if config.hard_negatives is None:
        return
    from clipdex.retrieval.evaluation.evaluate import encode_image_files

    loaded.model.eval()
    embeddings = encode_image_files(loaded.encoder(), data.train.images, batch_size=batch_size,
                                    workers=config.workers, options=data.options)  # fmt: skip
    data.neighbours = nearest_images(embeddings, config.hard_negatives)


def epoch_pairs(config: FinetuneConfig, data: Data, loaded: LoadedModel, batch_size: int, epoch: int) -> Any:
    """(pixels, tokens) batches of one epoch, decoded with the training augmentation in the indexer's workers."""
    from clipdex.retrieval.imaging.loader import ImageFiles, iter_decoded

    seed = config.seed * 100_003 + epoch  # each epoch's order and augmentation, the same when resumed
    pairs = epoch_batches(data.train, batch_size, np.random.default_rng(seed), data.neighbours,
                          config.hard_negatives or 0)  # fmt: skip
    torch.manual_seed(seed)
    files = ImageFiles(data.train.images, loaded.preprocess_train, options=data.options)
    decoded = iter_decoded(files, workers=config.workers, batches=[[i for i, _ in b] for b in pairs], seed=seed)
    for batch, images in zip(pairs, decoded, strict=True):
        usable = [k for k, d in enumerate(images) if d.pixels is not None]  # a file gone since the check
        if len(usable) < 2:
            continue
        pixels = torch.stack([images[k].pixels for k in usable])  # type: ignore[misc]
        yield pixels, loaded.tokenizer([batch[k][1] for k in usable])
