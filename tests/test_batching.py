"""Concurrent queries encoded together: every caller gets its own row, errors reach everyone in the batch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from clipdex.retrieval.search.batching import Batcher, LRUCache


def _slow_encoder(calls: list[list[int]]):
    def encode(items: list[int]) -> np.ndarray:
        calls.append(list(items))
        time.sleep(0.05)  # long enough for the other threads to queue up behind the first forward
        return np.array([[float(i), float(i) * 2] for i in items], dtype=np.float32)

    return encode


def _run_threads(fn, n: int) -> list:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_each_caller_gets_its_own_row_and_waiting_callers_share_a_batch():
    calls: list[list[int]] = []
    alone: list[int] = []
    batcher = Batcher(_slow_encoder(calls), max_batch=8, alone=lambda item, v: alone.append(item))
    results = _run_threads(batcher, 20)
    for i, got in enumerate(results):
        np.testing.assert_array_equal(got, [[i, 2 * i]])
    assert sorted(i for batch in calls for i in batch) == list(range(20))  # each input encoded once
    assert max(len(b) for b in calls) > 1 and all(len(b) <= 8 for b in calls)
    assert len(calls) < 20
    assert alone == [b[0] for b in calls if len(b) == 1]
    np.testing.assert_array_equal(batcher(7), [[7, 14]])  # a lone call is a batch of one
    assert calls[-1] == [7] and alone[-1] == 7


def test_an_error_reaches_every_caller_of_its_batch_and_the_batcher_recovers():
    def encode(items: list[int]) -> np.ndarray:
        time.sleep(0.05)
        if 3 in items:
            raise ValueError("bad input in this batch")
        return np.ones((len(items), 2), dtype=np.float32)

    batcher = Batcher(encode)
    results = _run_threads(batcher, 6)
    failed = [r for r in results if isinstance(r, ValueError)]
    assert failed and isinstance(results[3], ValueError)
    assert all(isinstance(r, np.ndarray) for r in results if not isinstance(r, ValueError))
    np.testing.assert_array_equal(batcher(1), [[1, 1]])
    with pytest.raises(ValueError):
        batcher(3)


def test_lru_cache_keeps_the_recent_and_hands_out_copies():
    cache = LRUCache(size=2)
    cache.put("a", np.zeros(2))
    cache.put("b", np.ones(2))
    got = cache.get("a")
    got[0] = 9  # a caller changing its copy changes nothing cached
    np.testing.assert_array_equal(cache.get("a"), [0, 0])
    cache.put("c", np.ones(2))  # "b" is now the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None


def test_searcher_under_concurrency_equals_lone_encodings(tmp_path, tiny_model, cli):
    from conftest import run
    from corpus import make_images

    from clipdex.retrieval.search.searcher import Searcher

    make_images(tmp_path / "photos", 3, seed=97)
    run(cli, "index", tmp_path / "photos", "--index", tmp_path / "idx", *tiny_model.cli_args())
    texts = [f"a {c} {s} on a white background" for c in ("red", "blue", "green", "black") for s in ("circle", "cross")]
    lone = Searcher(tmp_path / "idx")
    want = np.concatenate([lone.embed_text(t) for t in texts])
    shared = Searcher(tmp_path / "idx", encoder=lone.encoder)
    got = _run_threads(lambda i: shared.embed_text(texts[i]), len(texts))
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-6)
    # what a lone query is answered with, bit for bit, whether cached or not
    for i, t in enumerate(texts[:3]):
        np.testing.assert_array_equal(Searcher(tmp_path / "idx", encoder=lone.encoder).embed_text(t), want[i : i + 1])
        np.testing.assert_array_equal(lone.embed_text(t), want[i : i + 1])
