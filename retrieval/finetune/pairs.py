"""Image–caption pairs to fine-tune on: split by image, and dealt into contrastive batches."""

from __future__ import annotations

import logging

import numpy as np

from clipdex.retrieval.errors import InputError
from clipdex.retrieval.evaluation.datasets import RetrievalDataset

log = logging.getLogger(__name__)


def split_by_image(ds: RetrievalDataset, fraction: float, seed: int) -> tuple[RetrievalDataset, RetrievalDataset]:
    """(train, validation): a seeded share of the images with all their captions held out, so no image has
    captions on both sides."""
    n = len(ds.images)
    n_val = round(fraction * n)
    if n < 2 or n_val < 1 or n_val >= n:
        raise InputError(
            f"{n} usable images are too few to hold out {fraction:.0%} for validation (each side needs one); "
            "give more pairs, a larger --val-fraction, or a validation file with --val"
        )
    order = np.random.default_rng(seed).permutation(n)
    return ds.subset(sorted(order[n_val:].tolist())), ds.subset(sorted(order[:n_val].tolist()))


def epoch_batches(ds: RetrievalDataset, batch_size: int, rng: np.random.Generator) -> list[list[tuple[int, str]]]:
    """One epoch of (image index, caption) batches: every image once, with one of its captions drawn at random.

    A batch never holds two captions of one image, nor the same caption text twice: in a contrastive loss
    either would be a false negative. A pair that would repeat a caption waits for the next batch. Batches of
    one pair (no negatives) are dropped."""
    pending = [
        (int(i), ds.captions[i][int(rng.integers(len(ds.captions[i])))]) for i in rng.permutation(len(ds.images))
    ]
    batches: list[list[tuple[int, str]]] = []
    while pending:
        batch: list[tuple[int, str]] = []
        texts: set[str] = set()
        rest = []
        for pair in pending:
            if len(batch) < batch_size and pair[1] not in texts:
                batch.append(pair)
                texts.add(pair[1])
            else:
                rest.append(pair)
        batches.append(batch)
        pending = rest
    return [b for b in batches if len(b) > 1]
