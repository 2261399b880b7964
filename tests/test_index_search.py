"""index → search (three directions) → re-index after add/edit/delete/rename → info, checked by brute force."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import assert_same_ranking, brute_force, counts, run, search_json
from corpus import draw, make_images, random_scene

from clipdex.retrieval import Searcher, Target


@pytest.fixture
def photo_corpus(tmp_path: Path, tiny_model):
    photos = tmp_path / "photos"
    items = make_images(photos, 60, seed=1)
    # nested folders, upper-case extensions and spaces in names must all be found
    items += make_images(photos / "nested dir" / "deeper", 12, seed=2, ext=".JPG")
    items += make_images(photos / "webp", 6, seed=3, ext=".webp")
    (photos / "notes.txt").write_text("not an image")
    captions = tmp_path / "captions.csv"
    rng = np.random.default_rng(0)
    with captions.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for path, scene in items[:40]:
            for cap in scene.captions(__import__("random").Random(int(rng.integers(1 << 30))), 2):
                w.writerow([os.path.relpath(path, tmp_path), cap])
    return photos, captions, [p for p, _ in items]


def test_index_then_search_matches_brute_force(cli, tmp_path, tiny_model, reference, photo_corpus):
    photos, captions, paths = photo_corpus
    index = tmp_path / "idx"
    summary = json.loads(
        run(
            cli,
            "index",
            photos,
            "--index",
            index,
            "--texts",
            captions,
            *tiny_model.cli_args(),
            "--batch-size",
            "16",
            "--workers",
            "2",
            "--json",
        )
    )
    with captions.open() as f:
        caption_rows = list(csv.DictReader(f))
    n_texts = len({(r["caption"], r["image"]) for r in caption_rows})
    assert counts(summary) == {"added": len(paths) + n_texts, "updated": 0, "removed": 0, "unchanged": 0, "failed": 0}

    image_paths = sorted(str(p.absolute()) for p in paths)
    image_vecs = reference.images([Path(p) for p in image_paths])

    # text → image
    for query in ["a large red circle on a blue background", "a green triangle", "cross"]:
        got = search_json(cli, index, query, "-k", "10")
        assert got["query"] == query and got["target"] == "images"
        order, scores = brute_force(reference.texts([query])[0], image_vecs, 10)
        assert_same_ranking(
            [h["path"] for h in got["results"]],
            [h["score"] for h in got["results"]],
            [image_paths[i] for i in order],
            scores,
        )
        assert all(h["kind"] == "image" for h in got["results"])
        assert [h["rank"] for h in got["results"]] == list(range(1, 11))

    # image → text: the index holds one text per (caption, image) row, so a caption linked to two images is
    # two items with equal scores; compare whole rankings of (caption, image) keys against brute force
    query_image = paths[3]
    qv = reference.images([query_image])[0]
    rows = sorted({(r["caption"], str((tmp_path / r["image"]).resolve())) for r in caption_rows})
    row_vecs = reference.texts([t for t, _ in rows])
    for k in (8, len(rows)):
        got = search_json(cli, index, "--image", query_image, "--target", "texts", "-k", k)
        order, scores = brute_force(qv, row_vecs, k)
        assert all(h["kind"] == "text" for h in got["results"])
        assert_same_ranking(
            [f"{h['text']}|{h['path']}" for h in got["results"]],
            [h["score"] for h in got["results"]],
            [f"{rows[i][0]}|{rows[i][1]}" for i in order],
            scores,
        )

    # image → image (the default target)
    got = search_json(cli, index, "--image", query_image, "--include-self", "-k", "5")
    order, scores = brute_force(qv, image_vecs, 5)
    assert_same_ranking(
        [h["path"] for h in got["results"]],
        [h["score"] for h in got["results"]],
        [image_paths[i] for i in order],
        scores,
    )
    assert got["results"][0]["path"] == str(query_image.absolute())
    linked = next(h for h in got["results"] if h["path"] == str(query_image.absolute()))
    assert linked["text"] is not None  # images named in the caption file carry a caption
    # by default the indexed image a query is (and its copies) is left out; the rest is brute force's order
    hidden = search_json(cli, index, "--image", query_image, "-k", "4")["results"]
    order, _ = brute_force(qv, image_vecs, len(image_paths))
    rest = [i for i in order if Path(image_paths[i]).read_bytes() != query_image.read_bytes()][:4]
    assert_same_ranking(
        [h["path"] for h in hidden], [h["score"] for h in hidden], [image_paths[i] for i in rest], image_vecs[rest] @ qv
    )

    info = json.loads(run(cli, "info", "--index", index, "--json"))
    assert info["counts"] == {"images": len(paths), "texts": n_texts, "failed": 0, "unlinked_texts": 0}
    assert info["dim"] == 32 and info["model"]["name"] == "tiny-clip"
    assert info["index_types"] == {"images": "IndexFlat", "texts": "IndexFlat"}
    assert info["size_bytes"] > 0


def test_image_to_text_ranking_on_pure_texts(cli, tmp_path, tiny_model, reference):
    items = make_images(tmp_path / "p", 10, seed=7)
    corpus = tmp_path / "texts.txt"
    texts = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "cross")]
    corpus.write_text("\n".join(texts) + "\n\n")
    index = tmp_path / "idx"
    run(cli, "index", tmp_path / "p", "--texts", corpus, "--index", index, *tiny_model.cli_args())
    got = search_json(cli, index, "--image", items[0][0], "--target", "texts", "-k", "12")
    order, scores = brute_force(reference.images([items[0][0]])[0], reference.texts(texts), 12)
    assert_same_ranking(
        [h["text"] for h in got["results"]], [h["score"] for h in got["results"]], [texts[i] for i in order], scores
    )
    assert all(h["path"] is None for h in got["results"])  # pure texts have no path
    for query in ("a red circle", "blue square", "something yellow"):  # text → text, whole rankings
        got = search_json(cli, index, query, "--target", "texts", "-k", "12")
        order, scores = brute_force(reference.texts([query])[0], reference.texts(texts), 12)
        assert_same_ranking(
            [h["text"] for h in got["results"]], [h["score"] for h in got["results"]], [texts[i] for i in order], scores
        )


def test_reindex_add_edit_delete_rename(cli, tmp_path, tiny_model, reference):
    photos = tmp_path / "photos"
    items = make_images(photos, 40, seed=11)
    index = tmp_path / "idx"
    run(cli, "index", photos, "--index", index, *tiny_model.cli_args())

    same = json.loads(run(cli, "index", photos, "--index", index, "--json"))
    assert counts(same) == {"added": 0, "updated": 0, "removed": 0, "unchanged": 40, "failed": 0}

    added = make_images(photos / "new", 10, seed=12, start=100)
    edited = items[0][0]
    draw(random_scene(__import__("random").Random(99)), noise_seed=5).save(edited)
    os.utime(edited, (time.time() + 5, time.time() + 5))
    deleted = [p for p, _ in items[1:6]]
    for p in deleted:
        p.unlink()
    touched = items[6][0]
    os.utime(touched, (time.time() + 10, time.time() + 10))  # new mtime, same bytes: not re-encoded

    summary = json.loads(run(cli, "index", photos, "--index", index, "--json"))
    assert counts(summary) == {"added": 10, "updated": 1, "removed": 5, "unchanged": 40 - 1 - 5, "failed": 0}

    live = sorted(str(p.absolute()) for p in photos.rglob("*.png"))
    vecs = reference.images([Path(p) for p in live])
    for query in ["a red circle", "a blue square on a white background", "yellow cross"]:
        got = search_json(cli, index, query, "-k", str(len(live) + 10))
        paths = [h["path"] for h in got["results"]]
        assert sorted(paths) == live  # every live file exactly once, no deleted path
        assert not set(map(str, deleted)) & set(paths)
        order, scores = brute_force(reference.texts([query])[0], vecs, 10)
        assert_same_ranking(paths[:10], [h["score"] for h in got["results"][:10]], [live[i] for i in order], scores)
    hit = search_json(cli, index, "--image", edited, "--include-self", "-k", "1")["results"][0]
    assert hit["path"] == str(edited.absolute()) and hit["score"] == pytest.approx(1.0, abs=1e-5)
    assert next(str(p) for p, _ in added) in {h["path"] for h in search_json(cli, index, "x", "-k", "100")["results"]}

    # a renamed file and a copied file reuse the stored vector instead of being encoded again
    before = _catalog(index)
    renamed = photos / "renamed.png"
    items[10][0].rename(renamed)
    shutil.copy(items[11][0], photos / "copy.png")
    summary = json.loads(run(cli, "index", photos, "--index", index, "--json"))
    assert counts(summary) == {"added": 2, "updated": 0, "removed": 1, "unchanged": 44, "failed": 0}
    after = _catalog(index)
    assert after[str(renamed)][1:] == before[str(items[10][0])][1:]
    assert after[str(photos / "copy.png")][1:] == before[str(items[11][0])][1:]
    shard_files = sorted((index / "vectors").glob("*.npy"))
    assert len(shard_files) == len({v[1] for v in after.values()})  # nothing new was written


def _catalog(index: Path) -> dict[str, tuple]:
    con = duckdb.connect(str(index / "catalog.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT path, id, shard, row FROM items WHERE kind = 'image'").fetchall()
    finally:
        con.close()
    return {r[0]: tuple(r[1:]) for r in rows}


def test_python_api(tmp_path, tiny_model):
    from clipdex.indexer import IndexConfig, run_index
    from clipdex.retrieval import EncoderConfig

    items = make_images(tmp_path / "p", 20, seed=5)
    summary = run_index(
        IndexConfig(
            paths=(tmp_path / "p",),
            index_dir=tmp_path / "idx",
            workers=0,
            encoder=EncoderConfig(model=str(tiny_model.config), pretrained=str(tiny_model.weights)),
        )
    )
    assert summary.added == 20
    searcher = Searcher(tmp_path / "idx")
    hits = searcher.search_image(items[4][0], k=3)
    assert hits[0].path == str(items[4][0].absolute()) and hits[0].rank == 1
    assert searcher.count(Target.IMAGES) == 20 and searcher.count(Target.TEXTS) == 0
    assert searcher.search_text("a red circle", k=5, target=Target.TEXTS) == []
    k_all = searcher.search_text("a red circle", k=100)
    assert len(k_all) == 20 and [h.score for h in k_all] == sorted((h.score for h in k_all), reverse=True)


def test_search_sees_last_published_state_while_writer_holds_catalog(tmp_path, tiny_model):
    """Readers never open the DuckDB file: while a writer holds it with committed, unpublished changes (an
    added image, a deleted one), a search answers from the last published state, then from the next."""
    from clipdex.indexer import IndexConfig, run_index
    from clipdex.retrieval.ann.build import index_writer
    from clipdex.retrieval.config import Kind
    from clipdex.retrieval.model.encoder import EncoderConfig, load_encoder
    from clipdex.retrieval.store.items import Record

    items = make_images(tmp_path / "p", 5, seed=9)
    enc_cfg = EncoderConfig(model=str(tiny_model.config), pretrained=str(tiny_model.weights))
    run_index(IndexConfig(paths=(tmp_path / "p",), index_dir=tmp_path / "idx", workers=0, encoder=enc_cfg))
    encoder = load_encoder(enc_cfg)
    published = {str(p) for p, _ in items}
    writer = index_writer(tmp_path / "idx", encoder.spec, encoder.dim)
    try:
        doomed = writer.rows("kind = 'image' AND path = ?", [str(items[0][0])])[0]["id"]
        vector = encoder.encode_texts(["a new thing"])[0]
        writer.commit(
            [Record(id=writer.new_id(), kind=Kind.IMAGE, source="s", path="/new.png", text=None, vector=vector)],
            delete_ids=[doomed],
        )
        during = Searcher(tmp_path / "idx", encoder=encoder).search_text("circle", k=10)
        assert {h.path for h in during} == published  # committed is not published
        writer.publish()
        after = Searcher(tmp_path / "idx", encoder=encoder).search_text("circle", k=10)
        assert {h.path for h in after} == published - {str(items[0][0])} | {"/new.png"}
    finally:
        writer.close()
