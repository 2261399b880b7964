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


def epoch_batches(
    ds: RetrievalDataset,
    batch_size: int,
    rng: np.random.Generator,
    neighbours: np.ndarray | None = None,
    group: int = 4,
) -> list[list[tuple[int, str]]]:
    """One epoch of (image index, caption) batches: every image once, with one of its captions drawn at random.

    A batch never holds two captions of one image, nor the same caption text twice: in a contrastive loss
    either would be a false negative. A pair that would repeat a caption waits for the next batch. Batches of
    one pair (no negatives) are dropped. With `neighbours` (`nearest_images`), the images come in groups of
    `group` similar ones (`hard_negative_order`), so each batch holds hard negatives."""
    order = rng.permutation(len(ds.images)) if neighbours is None else hard_negative_order(neighbours, group, rng)
    pending = [(int(i), ds.captions[i][int(rng.integers(len(ds.captions[i])))]) for i in order]
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


def nearest_images(embeddings: np.ndarray, group: int) -> np.ndarray:
    """For each image, its nearest others by decreasing cosine of their embeddings [images, m]: the first
    `group * 4` (enough to fill a group while some are taken by others)."""
    sims = embeddings @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    width = min(len(embeddings) - 1, group * 4)
    return np.argsort(-sims, axis=1, kind="stable")[:, :width]


def hard_negative_order(neighbours: np.ndarray, group: int, rng: np.random.Generator) -> np.ndarray:
    """An epoch's image order in groups of `group`: a random image not yet placed, then its nearest images not yet
    placed (`neighbours` [images, m], from `nearest_images`); a group whose near images are all placed stays short.
    Mined from the model's own similarities, so each batch holds the images it confuses; every image comes once."""
    n = len(neighbours)
    placed = np.zeros(n, dtype=bool)
    order: list[int] = []
    for anchor in rng.permutation(n):
        if placed[anchor]:
            continue
        placed[anchor] = True
        order.append(int(anchor))
        taken = 1
        for other in neighbours[anchor]:
            if taken == group:
                break
            if not placed[other]:
                placed[other] = True
                order.append(int(other))
                taken += 1
    return np.asarray(order)
