"""recall_at_k against a brute-force reference and against CLIP_benchmark's own recall_at_k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as cb_recall_at_k

from clipdex.retrieval.evaluation.metrics import recall_at_k

KS = (1, 2, 5, 10)


def corpus(seed: int, n_images: int, *, integer: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images with 0 to 7 captions; integer-valued embeddings make dot products exact, so ties are real."""
    rng = np.random.default_rng(seed)
    per_image = rng.choice([0, 1, 5, 5, 5, 6, 7], size=n_images)
    owner = np.repeat(np.arange(n_images), per_image)
    dim = 6
    if integer:
        images = rng.integers(-2, 3, (n_images, dim)).astype(np.float32)
        texts = rng.integers(-2, 3, (len(owner), dim)).astype(np.float32)
        texts[::4] = images[owner[::4]]  # some captions identical to their image's embedding
        images[1::9] = images[0]  # duplicate images
    else:
        images = rng.normal(size=(n_images, dim)).astype(np.float32)
        texts = (images[owner] + rng.normal(scale=1.5, size=(len(owner), dim))).astype(np.float32)
    return texts, images, owner


def bounds(texts, images, owner, k):
    """Brute force, optimistic and pessimistic about ties: any correct tie-break lies between."""
    scores = texts.astype(np.float64) @ images.T.astype(np.float64)
    t_hi = t_lo = 0
    for t in range(len(texts)):
        s, p = scores[t], owner[t]
        t_hi += np.sum(s > s[p]) < k
        t_lo += np.sum(s >= s[p]) - 1 < k
    i_hi = i_lo = 0
    for i in range(len(images)):
        s = scores[:, i]
        positives = np.nonzero(owner == i)[0]
        i_hi += any(np.sum(s > s[p]) < k for p in positives)
        i_lo += any(np.sum(s >= s[p]) - 1 < k for p in positives)
    return (t_lo / len(texts), t_hi / len(texts)), (i_lo / len(images), i_hi / len(images))


@pytest.mark.parametrize("seed", range(4))
def test_exact_without_ties(seed):
    texts, images, owner = corpus(seed, 40, integer=False)
    got = recall_at_k(texts, images, owner, KS)
    for k in KS:
        (t_lo, t_hi), (i_lo, i_hi) = bounds(texts, images, owner, k)
        assert t_lo == t_hi and i_lo == i_hi  # continuous scores: no ties
        assert got["text_to_image"][f"R@{k}"] == pytest.approx(t_hi, abs=1e-12)
        assert got["image_to_text"][f"R@{k}"] == pytest.approx(i_hi, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_ties_stay_within_brute_force_bounds_and_equal_clip_benchmark(seed):
    texts, images, owner = corpus(100 + seed, 70, integer=True)
    got = recall_at_k(texts, images, owner, KS)
    scores = torch.from_numpy(texts) @ torch.from_numpy(images).T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), torch.from_numpy(owner)] = True
    saw_tie_effect = False
    for k in KS:
        (t_lo, t_hi), (i_lo, i_hi) = bounds(texts, images, owner, k)
        saw_tie_effect |= t_lo != t_hi or i_lo != i_hi
        assert t_lo - 1e-12 <= got["text_to_image"][f"R@{k}"] <= t_hi + 1e-12
        assert i_lo - 1e-12 <= got["image_to_text"][f"R@{k}"] <= i_hi + 1e-12
        # CLIP_benchmark's own function on the same (exact) scores, as its evaluate() calls it
        cb_t2i = (cb_recall_at_k(scores, positive, k) > 0).float().mean().item()
        cb_i2t = (cb_recall_at_k(scores.T, positive.T, k) > 0).float().mean().item()
        assert got["text_to_image"][f"R@{k}"] == pytest.approx(cb_t2i, abs=1e-6)
        assert got["image_to_text"][f"R@{k}"] == pytest.approx(cb_i2t, abs=1e-6)
    assert saw_tie_effect  # the fixture really has ties at the cut-off


def test_images_without_captions_are_misses_and_k_beyond_n():
    images = np.eye(3, dtype=np.float32)
    texts = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0.1]], dtype=np.float32)
    owner = np.array([0, 1, 1])
    got = recall_at_k(texts, images, owner, (1, 50))
    assert got["text_to_image"] == {"R@1": 1.0, "R@50": 1.0}
    assert got["image_to_text"]["R@1"] == pytest.approx(2 / 3)  # image 2 has no caption
    assert got["image_to_text"]["R@50"] == pytest.approx(2 / 3)


def test_chunking_does_not_change_results(monkeypatch):
    import clipdex.retrieval.evaluation.metrics as m

    texts, images, owner = corpus(7, 60, integer=True)
    full = recall_at_k(texts, images, owner, KS)
    monkeypatch.setattr(m, "_CHUNK", 7)
    assert recall_at_k(texts, images, owner, KS) == full


@pytest.mark.parametrize("seed", range(4))
def test_reranked_recall_against_brute_force(seed):
    """Re-scoring each query's contrastive top-K: recall equals a loop that takes the top K by contrastive score,
    orders them by the new scores, then the rest by contrastive score. A re-scorer that returns the contrastive
    scores changes nothing; K = 1 changes nothing either."""
    from clipdex.retrieval.evaluation.metrics import reranked_recall_at_k

    texts, images, owner = corpus(seed, 40, integer=False)
    rng = np.random.default_rng(seed + 100)
    head = {"text_to_image": rng.normal(size=(len(texts), len(images))),
            "image_to_text": rng.normal(size=(len(images), len(texts)))}  # fmt: skip

    def rescore(direction, queries, candidates):
        return head[direction][queries[:, None], candidates]

    contrastive = texts.astype(np.float64) @ images.T.astype(np.float64)
    for k_rerank in (1, 4, 16):
        got = reranked_recall_at_k(texts, images, owner, (k_rerank, rescore), KS)
        for direction, scores in (("text_to_image", contrastive), ("image_to_text", contrastive.T)):
            hits = {k: 0 for k in KS}
            for q in range(scores.shape[0]):
                order = np.argsort(-scores[q], kind="stable")
                top = order[:k_rerank]
                ranked = [*top[np.argsort(-head[direction][q, top], kind="stable")], *order[k_rerank:]]
                for k in KS:
                    found = ranked[:k]
                    if direction == "text_to_image":
                        hits[k] += owner[q] in found
                    else:
                        hits[k] += any(owner[t] == q for t in found)
            for k in KS:
                assert got[direction][f"R@{k}"] == pytest.approx(hits[k] / scores.shape[0]), (direction, k, k_rerank)
    same = reranked_recall_at_k(texts, images, owner, (16, lambda d, q, c: (contrastive if d[0] == "t" else contrastive.T)[q[:, None], c]), KS)  # fmt: skip
    assert same == recall_at_k(texts, images, owner, KS)
    assert reranked_recall_at_k(texts, images, owner, (1, rescore), KS) == recall_at_k(texts, images, owner, KS)
