"""`clipdex embed`: clip-retrieval's layout, the indexed vectors, resumable per partition, to fsspec URLs."""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run, search_json
from corpus import make_captioned_library, make_images
from test_errors import assert_one_line_error

from clipdex.cli.main import app
from clipdex.retrieval.search.searcher import Searcher, Target


@pytest.fixture
def library(tmp_path):
    make_captioned_library(tmp_path, 30, 16, seed=301)
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path / "photos", tmp_path / "captions.csv"


def embed(cli, photos, captions, out, model, *extra) -> dict:
    return json.loads(run(cli, "embed", photos, "--texts", captions, "--out", out, *model.cli_args(), *extra, "--json"))


def read_layout(url: str) -> dict[int, tuple[str, np.ndarray, list[dict]]]:
    """Partition number → (kind, vectors, metadata rows), read with fsspec as another tool would."""
    fs, root = fsspec.core.url_to_fs(url)
    parts = {}
    for meta in fs.glob(f"{root}/metadata/metadata_*.parquet"):
        n = int(meta.rsplit("_", 1)[1].split(".")[0])
        kind = "img_emb" if fs.exists(f"{root}/img_emb/img_emb_{n}.npy") else "text_emb"
        with fs.open(f"{root}/{kind}/{kind}_{n}.npy", "rb") as f:
            vectors = np.load(io.BytesIO(f.read()), allow_pickle=False)
        with fs.open(meta, "rb") as f:
            rows = pq.read_table(io.BytesIO(f.read())).to_pylist()
        parts[n] = (kind, vectors, rows)
    return parts


def test_embed_writes_clip_retrieval_partitions_that_import_to_the_indexed_vectors(cli, tmp_path, tiny_model, library):
    photos, captions = library
    summary = embed(cli, photos, captions, tmp_path / "emb", tiny_model, "--partition-rows", 10)
    assert (summary["images"], summary["texts"], summary["failed"]) == (30, 16, 1)
    assert summary["failures"][0]["path"].endswith("broken.png") and "0x" not in summary["failures"][0]["error"]
    parts = read_layout(str(tmp_path / "emb"))
    assert sorted(parts) == list(range(6))  # 31 image files in 4 partitions of 10, then 16 captions in 2
    for kind, vectors, rows in parts.values():
        assert kind == ("img_emb" if rows and rows[0]["caption"] is None else "text_emb")
        assert len(vectors) == len(rows) and vectors.dtype == np.float32
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert all(("image_path" in r and "caption" in r) for r in rows)
    failed = pq.read_table(tmp_path / "emb" / "failures" / "failures_0.parquet").to_pylist()
    assert [r["path"] for r in failed] == [str(photos / "broken.png")]

    # what `clipdex index` stores for the same files, item for item
    run(cli, "index", photos, "--texts", captions, "--index", tmp_path / "indexed", *tiny_model.cli_args())
    run(cli, "import", tmp_path / "emb", "--index", tmp_path / "imported", *tiny_model.cli_args())
    a, b = Searcher(tmp_path / "indexed"), Searcher(tmp_path / "imported")
    for target in Target:
        want = {(r["path"], r["text"]): v for r, v in zip(a.rows(a.ids(target)), a.vectors(a.ids(target)), strict=True)}
        got = {(r["path"], r["text"]): v for r, v in zip(b.rows(b.ids(target)), b.vectors(b.ids(target)), strict=True)}
        assert got.keys() == want.keys()
        assert max(float(np.abs(got[k] - want[k]).max()) for k in got) < 1e-5
    for query in (["a red circle"], ["a blue square", "--target", "texts"]):
        got, want = (search_json(cli, tmp_path / i, *query, "-k", 6)["results"] for i in ("imported", "indexed"))
        assert [(h["path"], h["text"]) for h in got] == [(h["path"], h["text"]) for h in want]
        assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-5)


def test_embed_resumes_per_partition_and_plans_new_files(cli, tmp_path, tiny_model, library):
    photos, captions = library
    out = tmp_path / "emb"
    embed(cli, photos, captions, out, tiny_model, "--partition-rows", 10)
    before = read_layout(str(out))
    # a run stopped while writing partition 2: its vectors landed, its metadata (the done mark) did not
    (out / "metadata" / "metadata_2.parquet").unlink()
    (out / "img_emb" / "img_emb_2.npy.0123abcd.tmp").write_bytes(b"half a file")
    again = embed(cli, photos, captions, out, tiny_model, "--partition-rows", 10)
    assert again["written"] == 1 and again["images"] == 10 and again["texts"] == 0
    after = read_layout(str(out))
    assert after.keys() == before.keys()
    for n, (kind, vectors, rows) in before.items():
        assert after[n][0] == kind and after[n][2] == rows
        np.testing.assert_allclose(after[n][1], vectors, atol=1e-6)
    # files added since go to a new partition; nothing else is encoded again
    new = make_images(photos / "later", 3, seed=302)
    more = embed(cli, photos, captions, out, tiny_model, "--partition-rows", 10)
    assert more["written"] == 1 and more["images"] == 3
    kind, vectors, rows = read_layout(str(out))[6]
    assert kind == "img_emb" and sorted(r["image_path"] for r in rows) == sorted(str(p) for p, _ in new)
    assert embed(cli, photos, captions, out, tiny_model)["written"] == 0

    captions.write_text(captions.read_text() + "extra.png,one more caption\n")
    assert_one_line_error(
        cli.invoke(app, ["embed", str(photos), "--texts", str(captions), "--out", str(out), *tiny_model.cli_args()]),
        "changed since it was planned",
    )
    other = ["--model", "ViT-B-32", "--pretrained", str(tiny_model.weights)]
    assert_one_line_error(cli.invoke(app, ["embed", str(photos), "--out", str(out), *other]), "give the same --model")
    # without --model, a re-run finishes with the model the output was planned with
    (out / "metadata" / "metadata_0.parquet").unlink()
    assert json.loads(run(cli, "embed", photos, "--out", out, "--json"))["written"] == 1


def test_embed_to_an_fsspec_url_equals_a_local_folder(cli, tmp_path, tiny_model, library):
    photos, captions = library
    embed(cli, photos, captions, tmp_path / "local", tiny_model, "--partition-rows", 12)
    for url in ("memory://bucket/embeddings", f"file://{tmp_path}/as-url"):
        summary = embed(cli, photos, captions, url, tiny_model, "--partition-rows", 12)
        assert summary["written"] == summary["partitions"] == 5
        local, remote = read_layout(str(tmp_path / "local")), read_layout(url)
        assert local.keys() == remote.keys()
        for n in local:
            assert remote[n][0] == local[n][0] and remote[n][2] == local[n][2]
            np.testing.assert_array_equal(remote[n][1], local[n][1])
        assert embed(cli, photos, captions, url, tiny_model, "--partition-rows", 12)["written"] == 0
