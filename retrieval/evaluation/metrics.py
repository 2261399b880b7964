"""Recall@k for cross-modal retrieval, defined as CLIP_benchmark's `zeroshot_retrieval` defines it.

text→image R@k: the fraction of captions whose image is among the k best-scoring images.
image→text R@k: the fraction of images with at least one of their captions among the k best captions
(an image without captions counts as a miss, as there).

Ties: the k best are chosen by `torch.topk`, called per k on rows oriented as CLIP_benchmark orients
them (texts × images for text→image, images × texts for image→text). Among equal scores topk's
choice is unspecified but depends only on the row and k, so the same scores give the same recall.
Scores are computed once per distinct embedding, so identical captions or images tie exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

_CHUNK = 1024


def recall_at_k(
    text_emb: np.ndarray, image_emb: np.ndarray, text_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """{"text_to_image": {"R@k": ...}, "image_to_text": {"R@k": ...}} as fractions in [0, 1].

    `text_image[t]` is the index of the image that caption t describes; scores are dot products.
    The full score matrix is never held in memory.
    """
    return reranked_recall_at_k(text_emb, image_emb, text_image, None, ks)


Rescore = Callable[[str, np.ndarray, np.ndarray], np.ndarray]


def reranked_recall_at_k(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    text_image: np.ndarray,
    rerank: tuple[int, Rescore] | None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """Recall@k as `recall_at_k`, after re-scoring each query's contrastive top-K: `rerank` is (K, rescore) and
    `rescore(direction, queries, candidates)` gives the new scores [rows, K] for query indices [rows] and their
    candidates [rows, K] ("text_to_image": texts and images; "image_to_text": images and texts). The candidates
    rank above every other item, in their new order; the others keep their contrastive order."""
    text_image = np.asarray(text_image, dtype=np.int64)
    if len(text_image) != len(text_emb):
        raise ValueError(f"{len(text_emb)} text embeddings but {len(text_image)} caption→image links")
    texts_u, text_inv = _unique_rows(text_emb)
    images_u, image_inv = _unique_rows(image_emb)

    t2i = {k: np.zeros(len(text_emb), dtype=bool) for k in ks}
    for start in range(0, len(text_emb), _CHUNK):
        stop = min(start + _CHUNK, len(text_emb))
        scores = (texts_u[text_inv[start:stop]] @ images_u.T)[:, image_inv]
        scores = _reranked("text_to_image", np.arange(start, stop), scores, rerank)
        for k, top in _topk(scores, ks):
            t2i[k][start:stop] = (top == text_image[start:stop, None]).any(1)

    i2t = {k: np.zeros(len(image_emb), dtype=bool) for k in ks}
    for start in range(0, len(image_emb), _CHUNK):
        stop = min(start + _CHUNK, len(image_emb))
        scores = (images_u[image_inv[start:stop]] @ texts_u.T)[:, text_inv]
        scores = _reranked("image_to_text", np.arange(start, stop), scores, rerank)
        for k, top in _topk(scores, ks):
            i2t[k][start:stop] = (text_image[top] == np.arange(start, stop)[:, None]).any(1)

    return {
        "text_to_image": {f"R@{k}": _mean(t2i[k]) for k in ks},
        "image_to_text": {f"R@{k}": _mean(i2t[k]) for k in ks},
    }


def _reranked(
    direction: str, queries: np.ndarray, scores: np.ndarray, rerank: tuple[int, Rescore] | None
) -> np.ndarray:
    """`scores` with each row's top-K re-scored and lifted above the rest (float64: the lift loses no order)."""
    if rerank is None or scores.shape[1] == 0:
        return scores
    k, rescore = rerank
    k = min(k, scores.shape[1])
    candidates = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), k, dim=1).indices.numpy()
    new = np.asarray(rescore(direction, queries, candidates), dtype=np.float64)
    if new.shape != candidates.shape:
        raise ValueError(f"rescore gave {new.shape} scores for {candidates.shape} candidates")
    out = scores.astype(np.float64)
    lift = out.max() - new.min() + 1.0
    np.put_along_axis(out, candidates, new + lift, axis=1)
    return out


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, inverse = np.unique(np.ascontiguousarray(x, dtype=np.float32), axis=0, return_inverse=True)
    return unique, inverse.reshape(-1)


def _topk(scores: np.ndarray, ks: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    rows = torch.from_numpy(np.ascontiguousarray(scores))
    width = rows.shape[1]
    if width == 0:
        return [(k, np.zeros((rows.shape[0], 0), dtype=np.int64)) for k in ks]
    return [(k, torch.topk(rows, min(k, width), dim=1).indices.numpy()) for k in ks]


def _mean(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else 0.0
