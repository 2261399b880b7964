"""Automatic index choice, recall-targeted tuning, re-ranking, GPU-path backends, build and import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipdex.cli.main import app
from clipdex.retrieval import Searcher, Target, ann
from clipdex.retrieval.maintain.check import check_index


def clustered(n: int, dim: int, seed: int, *, clusters: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + rng.normal(scale=0.7, size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_clip_retrieval(src: Path, parts: list[int], dim: int, *, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    images, paths = [], []
    for p, n in enumerate(parts):
        for folder in ("img_emb", "text_emb", "metadata"):
            (src / folder).mkdir(parents=True, exist_ok=True)
        img = clustered(n, dim, seed + p)
        np.save(src / "img_emb" / f"img_emb_{p}.npy", img.astype(np.float16))
        np.save(src / "text_emb" / f"text_emb_{p}.npy", clustered(n, dim, seed + 100 + p).astype(np.float16))
        names = [f"/data/{p}/{i}.jpg" for i in range(n)]
        pq.write_table(
            pa.table({"image_path": names, "caption": [f"caption {p} {i}" for i in range(n)]}),
            src / "metadata" / f"metadata_{p}.parquet",
        )
        images.append(img.astype(np.float16).astype(np.float32))
        paths += names
    return np.concatenate(images), paths


def test_plan_follows_size_and_budget():
    assert ann.plan_index(1_000, 512).factory == "Flat"
    assert ann.plan_index(1_000_000, 512).factory == "IVF4096,Flat"
    assert ann.plan_index(1_000_000, 512, memory=ann.parse_memory("1.5G")).factory == "IVF4096,SQfp16"
    assert ann.plan_index(1_000_000, 512, memory=ann.parse_memory("600M")).factory == "IVF4096,SQ8"
    tight = ann.plan_index(1_000_000, 512, memory=ann.parse_memory("100M"))
    assert tight.factory.startswith("OPQ64,IVF4096,PQ64") and tight.bytes_estimate <= ann.parse_memory("100M")
    assert ann.plan_index(60_000, 64, memory=10_000_000).bytes_estimate <= 10_000_000
    with pytest.raises(ValueError, match="raise --memory"):
        ann.plan_index(1_000_000, 512, memory=1_000_000)
    assert ann.parse_memory("4G") == 4 << 30 and ann.parse_memory("512m") == 512 << 20 and ann.parse_memory("10") == 10


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_torch_exact_search_equals_faiss_and_brute_force(chunk):
    x = clustered(500, 16, 3)
    ids = np.arange(1000, 1500, dtype=np.int64)
    q = clustered(20, 16, 4)
    flat = ann.build_index([(x, ids)], 16, factory="Flat")
    torch_index = ann.TorchFlatIndex(*ann.flat_contents(flat), "cpu", chunk=chunk)
    fs, fi = flat.search(q, 12)
    ts, ti = torch_index.search(q, 12)
    brute = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :12] + 1000
    np.testing.assert_array_equal(ti, brute)
    np.testing.assert_array_equal(fi, brute)
    np.testing.assert_allclose(ts, fs, atol=1e-5)
    assert ann.place(flat, "cpu") is flat


def test_import_under_budget_reaches_stated_recall(cli, tmp_path, tiny_model):
    vectors, paths = write_clip_retrieval(tmp_path / "cr", [40_000, 30_000], 32)
    budget = 3 << 20
    result = cli.invoke(
        app,
        [
            "import",
            str(tmp_path / "cr"),
            "--index",
            str(tmp_path / "idx"),
            *tiny_model.cli_args(),
            "--memory",
            "3M",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["images"] == 70_000 and out["texts"] == 70_000 and out["partitions"] == 2
    info = out["ann"]["images"]
    assert not info["factory"].startswith("Flat") and info["bytes_estimate"] <= budget
    assert info["recall_at_10"] >= 0.95 and info["params"].startswith("nprobe=")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert (tmp_path / "idx" / manifest["snapshot"]["files"]["images"]).stat().st_size <= budget

    # queries the tuning never saw: random directions and the model's own text embeddings
    searcher = Searcher(tmp_path / "idx")
    rng = np.random.default_rng(7)
    queries = np.concatenate(
        [rng.normal(size=(100, 32)), searcher.encoder.encode_texts([f"a photo {i}" for i in range(100)])]
    )
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    got = searcher.search_vectors(queries, k=10)
    index_of = {p: i for i, p in enumerate(paths)}
    recall = np.mean([len({index_of[h.path] for h in hits} & set(t)) / 10 for hits, t in zip(got, truth, strict=True)])
    assert recall >= info["recall_at_10"] - 0.03
    assert got[0][0].kind == "image" and got[0][0].text is not None
    assert check_index(tmp_path / "idx").ok

    again = cli.invoke(app, ["import", str(tmp_path / "cr"), "--index", str(tmp_path / "idx"), *tiny_model.cli_args()])
    assert again.exit_code == 2 and "already holds an index" in again.stderr


def test_build_changes_index_type_and_keeps_results_sound(cli, tmp_path, tiny_model):
    write_clip_retrieval(tmp_path / "cr", [6_000], 32, seed=5)
    index = tmp_path / "idx"
    assert (
        cli.invoke(app, ["import", str(tmp_path / "cr"), "--index", str(index), *tiny_model.cli_args()]).exit_code == 0
    )
    assert json.loads((index / "manifest.json").read_text())["ann"]["images"]["factory"] == "Flat"
    result = cli.invoke(
        app, ["build", "--index", str(index), "--index-type", "IVF64,Flat", "--target-recall", "0.9", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)["ann"]["images"]
    assert info["factory"] == "IVF64,Flat" and info["recall_at_10"] >= 0.9 and info["reason"] == "--index-type"
    assert check_index(index).ok
    hits = Searcher(index).search_text("a photo", k=5)
    assert len(hits) == 5 and hits[0].score >= hits[-1].score
    bad = cli.invoke(app, ["build", "--index", str(index), "--index-type", "NotAnIndex"])
    assert bad.exit_code == 2 and "not a FAISS factory string" in bad.stderr
    bad = cli.invoke(app, ["build", "--index", str(index), "--memory", "lots"])
    assert bad.exit_code == 2 and "cannot read memory size" in bad.stderr


def test_incremental_publish_reuses_the_trained_index(tmp_path, tiny_model):
    from clipdex.retrieval.ann.build import AnnSettings, index_writer
    from clipdex.retrieval.config import Kind
    from clipdex.retrieval.model.encoder import EncoderConfig, load_encoder
    from clipdex.retrieval.store.items import Record

    encoder = load_encoder(EncoderConfig(model=str(tiny_model.config), pretrained=str(tiny_model.weights)))
    writer = index_writer(tmp_path / "idx", encoder.spec, encoder.dim)
    try:
        writer.set_ann_settings(AnnSettings(index_type="IVF32,Flat"))
        x = clustered(3_000, 32, 9)
        writer.commit(
            [
                Record(id=writer.new_id(), kind=Kind.IMAGE, source="s", path=f"/p/{i}", text=None, vector=v)
                for i, v in enumerate(x)
            ]
        )
        first = writer.publish().ann["images"]
        more = clustered(500, 32, 10)
        writer.commit(
            [
                Record(id=writer.new_id(), kind=Kind.IMAGE, source="s", path=f"/q/{i}", text=None, vector=v)
                for i, v in enumerate(more)
            ],
            delete_ids=list(range(100)),
        )
        second = writer.publish().ann["images"]
    finally:
        writer.close()
    assert second.trained_n == first.trained_n == 3_000 and second.n == 3_400
    assert check_index(tmp_path / "idx").ok
    hits = Searcher(tmp_path / "idx", encoder=encoder).search_vectors(more[:1], k=1, target=Target.IMAGES)
    assert hits[0][0].path == "/q/0"


def test_import_errors(cli, tmp_path, tiny_model):
    assert (
        "no such folder"
        in cli.invoke(
            app, ["import", str(tmp_path / "none"), "--index", str(tmp_path / "i"), *tiny_model.cli_args()]
        ).stderr
    )
    (tmp_path / "empty").mkdir()
    assert (
        "no clip-retrieval output"
        in cli.invoke(
            app, ["import", str(tmp_path / "empty"), "--index", str(tmp_path / "i"), *tiny_model.cli_args()]
        ).stderr
    )
    write_clip_retrieval(tmp_path / "wide", [50], 48)
    r = cli.invoke(app, ["import", str(tmp_path / "wide"), "--index", str(tmp_path / "i2"), *tiny_model.cli_args()])
    assert r.exit_code == 2 and "wrong --model" in r.stderr


def test_float16_shards_only_past_exact_size_per_kind(tmp_path, tiny_model, monkeypatch):
    from clipdex.retrieval.ann.build import index_writer
    from clipdex.retrieval.config import Kind
    from clipdex.retrieval.model.encoder import EncoderConfig, load_encoder
    from clipdex.retrieval.store.items import Record

    monkeypatch.setattr(ann, "EXACT_MAX", 100)
    encoder = load_encoder(EncoderConfig(model=str(tiny_model.config), pretrained=str(tiny_model.weights)))
    writer = index_writer(tmp_path / "idx", encoder.spec, encoder.dim)

    def add(kind: Kind, n: int, seed: int) -> np.dtype:
        writer.commit(
            [
                Record(id=writer.new_id(), kind=kind, source="s", path=None, text="t", vector=v)
                for v in clustered(n, 32, seed)
            ]
        )
        return np.load(sorted((tmp_path / "idx" / "vectors").glob("*.npy"))[-1]).dtype

    try:
        assert add(Kind.IMAGE, 80, 1) == np.float32
        assert add(Kind.TEXT, 80, 2) == np.float32  # 160 items in all, but each kind is still exact-sized
        assert add(Kind.IMAGE, 50, 3) == np.float16  # images pass 100
        assert add(Kind.TEXT, 10, 4) == np.float32
    finally:
        writer.close()


def test_a_few_queries_search_in_their_own_thread_alone_and_rank_as_brute_force():
    """A search of fewer queries than FAISS's BLAS threshold runs with one OpenMP thread (its team's spinning
    workers would compete with ONNX Runtime's), only in the calling thread and only while it searches; results
    equal brute force whatever the number of queries."""
    import threading

    import faiss

    from clipdex.retrieval.ann.tune import search_reranked, threads_for

    before = faiss.omp_get_max_threads()
    seen: dict[str, int] = {}
    with threads_for(1):
        seen["few"] = faiss.omp_get_max_threads()
        other = threading.Thread(target=lambda: seen.setdefault("other thread", faiss.omp_get_max_threads()))
        other.start()
        other.join()
    with threads_for(64):
        seen["many"] = faiss.omp_get_max_threads()
    assert seen == {"few": 1, "other thread": before, "many": before} and faiss.omp_get_max_threads() == before
    rng = np.random.default_rng(7)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(16))
    index.add_with_ids(x, np.arange(500, dtype=np.int64) * 3)
    for n in (1, 5, 40):
        q = rng.standard_normal((n, 16)).astype(np.float32)
        scores, ids = search_reranked(index, q, 10, None)
        want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
        np.testing.assert_array_equal(ids, want * 3)
        np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, want, axis=1), rtol=1e-5, atol=1e-5)
