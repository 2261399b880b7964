"""Indexes larger than memory: inverted lists on disk equal in-memory ones, and a build of embeddings four times the
budget holds no more than `--memory` and searches correctly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run, search_json
from corpus import write_tiny_config

from clipdex.retrieval import ann
from clipdex.retrieval.maintain.check import check_index
from clipdex.retrieval.search.searcher import Searcher, Target

REPO = Path(__file__).parents[1]


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, dim)).astype(np.float32)
    x = centers[rng.integers(0, 64, n)] + rng.normal(scale=0.5, size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_on_disk_lists_search_exactly_as_in_memory_ones(tmp_path):
    x = clustered(30_000, 48, seed=1)
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3

    def batches():
        for s in range(0, len(x), 4000):
            yield x[s : s + 4000], ids[s : s + 4000]

    train = x[::5]
    memory = ann.build_index(batches(), 48, factory="IVF64,Flat", train=train)
    on_disk = ann.build_on_disk(
        batches(), 48, factory="IVF64,Flat", train=lambda: train, lists=tmp_path / "a.ivfdata", block_bytes=200_000
    )
    assert not list(tmp_path.glob("*.tmp"))  # the blocks (many: 200 kB each) are merged and gone
    ann.write_index(on_disk, tmp_path / "a.faiss")
    moved = tmp_path / "moved"  # the lists are found beside the index, by their name, wherever the pair goes
    moved.mkdir()
    for name in ("a.faiss", "a.ivfdata"):
        (tmp_path / name).rename(moved / name)
    back = ann.read_index(moved / "a.faiss")
    assert ann.is_on_disk(back) and not ann.is_on_disk(memory) and back.ntotal == len(x)
    queries = clustered(200, 48, seed=2)
    for nprobe in (1, 4, 16):
        ann.apply_params(memory, f"nprobe={nprobe}")
        ann.apply_params(back, f"nprobe={nprobe}")
        d_mem, i_mem = memory.search(queries, 10)
        d_disk, i_disk = back.search(queries, 10)
        np.testing.assert_array_equal(i_disk, i_mem)
        np.testing.assert_allclose(d_disk, d_mem, atol=1e-6)
    assert np.array_equal(np.sort(ann.index_ids(back)), ids)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model with 256-dimensional embeddings (random weights: it only encodes the odd text query)."""
    folder = tmp_path_factory.mktemp("wide")
    config = write_tiny_config(folder, name="tiny-clip-wide")
    spec = json.loads(config.read_text())
    spec["embed_dim"] = 256
    config.write_text(json.dumps(spec))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    weights = folder / "tiny-clip-wide.pt"
    torch.save(open_clip.create_model("tiny-clip-wide").state_dict(), weights)
    return config, weights


def test_a_build_four_times_its_budget_holds_within_it_and_searches_right(cli, tmp_path, wide_model):
    budget, dim, n, part = 24 << 20, 256, 100_000, 25_000
    assert n * dim * 4 >= 4 * budget  # the embeddings are four times the memory the build may hold
    src = tmp_path / "emb"
    (src / "img_emb").mkdir(parents=True)
    (src / "metadata").mkdir()
    x = clustered(n, dim, seed=3)
    for p in range(n // part):
        np.save(src / "img_emb" / f"img_emb_{p}.npy", x[p * part : (p + 1) * part])
        paths = [f"/library/{p}/{i:06d}.jpg" for i in range(part)]
        pq.write_table(
            pa.table({"image_path": paths, "caption": pa.nulls(part, pa.string())}),
            src / "metadata" / f"metadata_{p}.parquet",
        )
    index = tmp_path / "idx"
    config, weights = wide_model
    cmd = [sys.executable, str(REPO / "tests" / "held_memory.py"), "import", str(src), "--index", str(index)]
    cmd += ["--model", str(config), "--pretrained", str(weights), "--on-disk", "--memory", "24M", "--json"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    builds = json.loads(done.stderr.strip().splitlines()[-1])
    assert [b["vectors"] for b in builds] == [n]
    assert builds[0]["held"] <= budget, f"the build held {builds[0]['held'] / 2**20:.1f} MiB"
    manifest = json.loads((index / "manifest.json").read_text())
    info = manifest["ann"]["images"]
    assert info["on_disk"] and info["factory"].startswith("IVF")
    lists = index / manifest["snapshot"]["files"]["images_lists"]
    assert lists.stat().st_size >= n * dim * 4  # the lists (every vector, exact) are on disk, not in the index file
    assert (index / manifest["snapshot"]["files"]["images"]).stat().st_size < lists.stat().st_size / 20
    assert check_index(index).ok

    # searches: recall@10 against brute force over the embeddings meets the target the build tuned for
    searcher = Searcher(index)
    assert ann.is_on_disk(searcher.ann_index(Target.IMAGES))
    queries = clustered(100, dim, seed=4)
    hits = searcher.search_vectors(queries, k=10)
    truth = np.argsort(-(x @ queries.T), axis=0)[:10].T
    names = {f"/library/{i // part}/{i % part:06d}.jpg": i for i in range(n)}
    found = sum(len({names[h.path] for h in row} & set(t.tolist())) for row, t in zip(hits, truth, strict=True))
    assert found / truth.size >= min(info["recall_at_10"], manifest["ann_settings"]["target_recall"]) - 0.05
    assert len(search_json(cli, index, "a photo", "-k", 5)["results"]) == 5

    # a rebuild publishes new lists and deletes the old generation's
    run(cli, "build", "--index", index, "--on-disk", "--memory", "24M")
    after = json.loads((index / "manifest.json").read_text())["snapshot"]["files"]
    assert after["images_lists"] != lists.name and not lists.exists() and (index / after["images_lists"]).exists()
    assert check_index(index).ok
