"""An index over years: aliases, edits under IVF and HNSW, removals, moved weights, damage and repair.

Each test drives the CLI (in-process) the way a user would and compares with brute force or with the disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import assert_same_ranking, brute_force, counts, run, search_json
from corpus import edit, make_images
from test_errors import assert_one_line_error

from clipdex.cli.main import app
from clipdex.retrieval import Searcher
from clipdex.retrieval.maintain.check import check_index


def catalog_rows(index: Path, sql: str = "SELECT path FROM items WHERE kind = 'image'") -> list[tuple]:
    con = duckdb.connect(str(index / "catalog.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def all_hits(cli, index: Path, target: str = "images") -> list[dict]:
    return search_json(cli, index, "anything", "--target", target, "-k", "10000")["results"]


def test_one_item_per_file_however_it_is_named(cli, tmp_path, tiny_model, monkeypatch):
    photos = tmp_path / "photos"
    items = make_images(photos, 8, seed=41)
    index = tmp_path / "idx"
    run(cli, "index", photos, "--index", index, *tiny_model.cli_args())
    (tmp_path / "elsewhere").mkdir()
    os.symlink(photos, tmp_path / "elsewhere" / "link_to_photos")
    os.symlink(items[0][0], photos / "link_to_first.png")
    monkeypatch.chdir(tmp_path / "elsewhere")
    captions = tmp_path / "elsewhere" / "caps.csv"
    captions.write_text(f"image,caption\n../photos/{items[1][0].name},a caption\nlink_to_photos/{items[2][0].name},b\n")
    for spelling in ("../photos", str(tmp_path / "elsewhere" / "link_to_photos"), f"{photos}/./", "link_to_photos/.."):
        target = spelling if not spelling.endswith("..") else str(photos)
        summary = json.loads(run(cli, "index", target, "--index", index, "--json"))
        assert summary["added"] == 0 and summary["unchanged"] == 8, (spelling, summary)
    summary = json.loads(run(cli, "index", "--texts", captions, "--index", index, "--json"))
    assert summary["added"] == 2  # the two captions; their images are the indexed files
    paths = sorted(r[0] for r in catalog_rows(index))
    assert paths == sorted(str(p) for p, _ in items)
    hits = search_json(
        cli, index, "--image", tmp_path / "elsewhere" / "link_to_photos" / items[3][0].name, "--include-self", "-k", "8"
    )
    assert [h["path"] for h in hits["results"]].count(str(items[3][0])) == 1
    assert hits["results"][0]["path"] == str(items[3][0])
    texts = {h["text"]: h["path"] for h in all_hits(cli, index, "texts")}
    assert texts == {"a caption": str(items[1][0]), "b": str(items[2][0])}
    assert check_index(index).ok


@pytest.mark.parametrize("index_type", ["IVF4,Flat", "IVF4,SQ8", "IVF4,PQ8x4", "HNSW8"])
def test_edited_images_find_themselves_in_every_index_type(cli, tmp_path, tiny_model, reference, index_type):
    photos = tmp_path / "photos"
    items = make_images(photos, 48, seed=43)
    index = tmp_path / "idx"
    run(cli, "index", photos, "--index", index, *tiny_model.cli_args())
    run(cli, "build", "--index", index, "--index-type", index_type, "--target-recall", "0.8")
    factory = json.loads((index / "manifest.json").read_text())["ann"]["images"]["factory"]
    assert factory == index_type
    edited = [p for p, _ in items[::3]]
    for i, path in enumerate(edited):
        edit(path, 1000 + i)
    items[1][0].unlink()
    summary = json.loads(run(cli, "index", photos, "--index", index, "--json"))
    assert summary["updated"] == len(edited) and summary["removed"] == 1
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["ann"]["images"]["factory"] == index_type  # updated in place or rebuilt, never demoted
    for path in edited:
        hit = search_json(cli, index, "--image", path, "--include-self", "-k", "1")["results"][0]
        assert hit["path"] == str(path) and hit["score"] == pytest.approx(1.0, abs=1e-4)
    live = sorted(str(p) for p, _ in items if p.exists())
    vecs = reference.images([Path(p) for p in live])
    for query in ("a red circle", "a small blue cross on a white background"):
        got = search_json(cli, index, query, "-k", "5")["results"]
        want = vecs @ reference.texts([query])[0]
        for h in got:  # every returned score is the exact cosine of that file
            assert h["score"] == pytest.approx(float(want[live.index(h["path"])]), abs=2e-5)
    report = check_index(index)
    assert report.ok, report.to_json()


def test_check_reports_an_index_that_kept_old_vectors(cli, tmp_path, tiny_model):
    """The failure the previous in-place update had: an edited item's old vector left in the IVF lists."""
    photos = tmp_path / "photos"
    items = make_images(photos, 40, seed=44)
    index = tmp_path / "idx"
    run(cli, "index", photos, "--index", index, *tiny_model.cli_args(), "--index-type", "IVF4,Flat")
    manifest = json.loads((index / "manifest.json").read_text())
    old_faiss = (index / manifest["snapshot"]["files"]["images"]).read_bytes()
    for i, (path, _) in enumerate(items[:10]):
        edit(path, 2000 + i)
    run(cli, "index", photos, "--index", index)
    assert check_index(index).ok
    manifest = json.loads((index / "manifest.json").read_text())
    current = index / manifest["snapshot"]["files"]["images"]
    current.write_bytes(old_faiss)  # the same ids, the vectors from before the edits
    from clipdex.retrieval.config import sha256_file

    manifest["snapshot"]["sha256"]["images"] = sha256_file(current)
    (index / "manifest.json").write_text(json.dumps(manifest))
    report = check_index(index)
    assert not report.ok and any("differ from the stored vectors" in p for p in report.problems), report.problems
    run(cli, "build", "--index", index)
    assert check_index(index).ok


def test_remove_and_gone_folders(cli, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    kept = make_images(photos / "kept", 6, seed=45)
    emptied = make_images(photos / "emptied", 5, seed=46)
    deleted = make_images(tmp_path / "deleted", 4, seed=47)
    removed = make_images(photos / "removed", 3, seed=48)
    captions = tmp_path / "caps.csv"
    rows = [(p, f"caption {i}") for i, (p, _) in enumerate(kept[:2] + emptied[:2] + deleted[:1] + removed[:1])]
    captions.write_text("image,caption\n" + "".join(f"{os.path.relpath(p, tmp_path)},{c}\n" for p, c in rows))
    index = tmp_path / "idx"
    run(cli, "index", photos, tmp_path / "deleted", "--texts", captions, "--index", index, *tiny_model.cli_args())
    assert len(all_hits(cli, index)) == 18

    out = json.loads(run(cli, "remove", photos / "removed", "--index", index, "--json"))
    assert out["removed"] == 3 and out["unlinked_texts"] == 1
    for p, _ in emptied:
        p.unlink()
    shutil.rmtree(tmp_path / "deleted")
    result = cli.invoke(app, ["index", str(photos / "emptied"), str(tmp_path / "deleted"), "--index", str(index)])
    assert result.exit_code == 0, result.stderr
    # a folder emptied inside is emptied; a root that is gone as a whole is an unplugged drive: kept, offline
    assert "holds no images now: removed the 5 items" in result.stderr
    assert "is missing: its 4 items are kept, offline" in result.stderr
    assert {h["path"] for h in all_hits(cli, index)} == {str(p) for p, _ in kept}  # hidden from searches
    info = json.loads(run(cli, "info", "--index", index, "--json"))
    assert info["offline"] == {"folders": [str(tmp_path / "deleted")], "items": 4}
    pruned = json.loads(run(cli, "index", tmp_path / "deleted", "--index", index, "--prune-missing", "--json"))
    assert pruned["removed"] == 4
    assert json.loads(run(cli, "info", "--index", index, "--json"))["offline"] == {"folders": [], "items": 0}
    left = {h["path"] for h in all_hits(cli, index)}
    assert left == {str(p) for p, _ in kept}
    texts = {h["text"]: h["path"] for h in all_hits(cli, index, "texts")}
    assert len(texts) == 6  # every caption kept; only those of kept images are still linked
    assert {t for t, p in texts.items() if p is not None} == {"caption 0", "caption 1"}
    info = json.loads(run(cli, "info", "--index", index, "--json"))
    assert info["counts"]["unlinked_texts"] == 4
    again = json.loads(run(cli, "remove", photos / "removed", "--index", index, "--json"))
    assert again["removed"] == 0 and again["not_indexed"] == [str(photos / "removed")]
    # a folder the index never held is still a typo, not a removal
    assert_one_line_error(cli.invoke(app, ["index", str(tmp_path / "typo"), "--index", str(index)]), "no such file")
    # the image comes back: its captions are linked again
    make_images(photos / "emptied", 5, seed=46)
    run(cli, "index", photos / "emptied", "--index", index)
    texts = {h["text"]: h["path"] for h in all_hits(cli, index, "texts")}
    assert texts["caption 2"] == str(emptied[0][0])
    assert check_index(index).ok


def test_removed_items_come_back_with_their_folder_unless_forgotten(cli, tmp_path, tiny_model):
    """`remove` of a folder inside an indexed one says that the next `index` of that folder brings it back, and
    does so; `remove --forget` keeps it out of later runs, until the folder is named again."""
    photos = tmp_path / "photos"
    make_images(photos / "kept", 4, seed=51)
    private = [p for p, _ in make_images(photos / "private", 3, seed=52)]
    index = tmp_path / "idx"
    run(cli, "index", photos, "--index", index, *tiny_model.cli_args())
    paths = lambda: {h["path"] for h in all_hits(cli, index)}  # noqa: E731
    result = cli.invoke(app, ["remove", str(photos / "private"), "--index", str(index)])
    assert result.exit_code == 0 and "brings it back" in result.stderr and "--forget" in result.stderr
    run(cli, "index", photos, "--index", index)
    assert {str(p) for p in private} <= paths()  # as the note said
    out = json.loads(run(cli, "remove", photos / "private", "--index", index, "--forget", "--json"))
    assert out["removed"] == 3 and out["forgotten"] == [str(photos / "private")]
    run(cli, "index", photos, "--index", index)
    assert not {str(p) for p in private} & paths() and len(paths()) == 4
    run(cli, "index", photos / "private", "--index", index)  # named again: back, and no longer forgotten
    run(cli, "index", photos, "--index", index)
    assert {str(p) for p in private} <= paths() and len(paths()) == 7
    assert check_index(index).ok


def test_moved_checkpoint_keeps_the_index_searchable(cli, tmp_path, tiny_model, weights_cache):
    weights = tmp_path / "weights" / "model.pt"
    weights.parent.mkdir()
    shutil.copy(tiny_model.weights, weights)
    items = make_images(tmp_path / "photos", 6, seed=49)
    index = tmp_path / "idx"
    run(cli, "index", tmp_path / "photos", "--index", index, "--model", tiny_model.config, "--pretrained", weights)
    before = search_json(cli, index, "a red circle")["results"]
    moved = tmp_path / "moved.pt"
    weights.rename(moved)
    assert search_json(cli, index, "a red circle")["results"] == before  # found by content in the cache
    for copy in (weights_cache / "weights").glob("*"):
        copy.unlink()
    # no weights anywhere: the model's ONNX export (in the cache) still answers without them
    assert search_json(cli, index, "a red circle")["results"] == before
    shutil.rmtree(weights_cache / "exports")
    result = cli.invoke(app, ["search", "a red circle", "--index", str(index)])
    assert_one_line_error(result, "is gone", "--pretrained FILE")
    run(cli, "index", tmp_path / "photos", "--index", index, "--pretrained", moved)  # same content, new place
    assert json.loads((index / "manifest.json").read_text())["model"]["pretrained"] == str(moved)
    assert search_json(cli, index, "a red circle")["results"] == before
    other = tmp_path / "other.pt"
    state = __import__("torch").load(moved, weights_only=True)
    state["logit_scale"] += 1
    __import__("torch").save(state, other)
    result = cli.invoke(app, ["index", str(tmp_path / "photos"), "--index", str(index), "--pretrained", str(other)])
    assert_one_line_error(result, "is not the one the index was built with")
    assert items


def test_cleanup_keeps_what_the_published_snapshot_reads(cli, tmp_path, tiny_model):
    """A run killed after committing deletions but before publishing them: the next writer's clean-up must
    not delete the shards the published (IVF, re-ranked from shards) snapshot still reads."""
    from clipdex.retrieval.ann.build import index_writer
    from clipdex.retrieval.store.manifest import read_manifest

    items = make_images(tmp_path / "photos", 40, seed=50)
    index = tmp_path / "idx"
    run(cli, "index", tmp_path / "photos", "--index", index, *tiny_model.cli_args(), "--index-type", "IVF4,Flat")
    before = search_json(cli, index, "a green square", "-k", "40")["results"]
    manifest = read_manifest(index)
    writer = index_writer(index, manifest.model, manifest.dim)
    writer.commit([], delete_ids=[r["id"] for r in writer.rows("kind = 'image'")])
    writer.close()  # dies before publishing
    index_writer(index, manifest.model, manifest.dim).close()  # the next run opens (and cleans up)
    assert search_json(cli, index, "a green square", "-k", "40")["results"] == before
    assert check_index(index).ok
    run(cli, "index", tmp_path / "photos", "--index", index)  # and the next real run brings it back
    assert len(all_hits(cli, index)) == len(items)


def test_interrupted_import_resumes_without_duplicates(cli, tmp_path, tiny_model, monkeypatch):
    from test_ann import write_clip_retrieval

    import clipdex.indexer.importer as importer
    from clipdex.retrieval.store.writer import IndexWriter

    monkeypatch.setattr(importer, "_CHUNK", 1000)
    write_clip_retrieval(tmp_path / "cr", [2500, 1500], 32)
    real_commit = IndexWriter.commit
    calls = []

    def dying_commit(self, records, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies here, after two chunks committed
        return real_commit(self, records, **kw)

    monkeypatch.setattr(IndexWriter, "commit", dying_commit)
    args = ["import", str(tmp_path / "cr"), "--index", str(tmp_path / "idx"), *tiny_model.cli_args(), "--json"]
    assert cli.invoke(app, args).exit_code != 0
    monkeypatch.setattr(IndexWriter, "commit", real_commit)
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["resumed"] and out["images"] == 2000  # the two chunks left
    ids = catalog_rows(tmp_path / "idx", "SELECT kind, count(*), count(DISTINCT path) FROM items GROUP BY kind")
    assert sorted(ids) == [("image", 4000, 4000), ("text", 4000, 4000)]
    assert check_index(tmp_path / "idx").ok
    again = cli.invoke(app, args)
    assert again.exit_code == 2 and "already holds an index" in again.stderr


def test_no_tracebacks_and_a_failed_first_run_leaves_nothing(cli, tmp_path, tiny_model):
    make_images(tmp_path / "photos", 6, seed=51)
    (tmp_path / "afile").write_text("x")
    for command in (
        ["index", str(tmp_path / "photos")],
        ["search", "x"],
        ["info"],
        ["check"],
        ["build"],
        ["remove", "x"],
    ):
        assert_one_line_error(cli.invoke(app, [*command, "--index", str(tmp_path / "afile")]), "is a file")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        cli.invoke(app, ["index", str(tmp_path / "empty"), "--index", str(tmp_path / "new"), *tiny_model.cli_args()]),
        "no image files",
    )
    assert not (tmp_path / "new").exists()
    (tmp_path / "made").mkdir()
    assert_one_line_error(
        cli.invoke(app, ["index", str(tmp_path / "empty"), "--index", str(tmp_path / "made"), *tiny_model.cli_args()]),
        "no image files",
    )
    assert (tmp_path / "made").is_dir() and not any((tmp_path / "made").iterdir())
    assert_one_line_error(
        cli.invoke(
            app,
            [
                "index",
                str(tmp_path / "photos"),
                "--index",
                str(tmp_path / "new"),
                *tiny_model.cli_args(),
                "--index-type",
                "IVF4,PQ5",
            ],
        ),
        "dimension 32",
    )
    assert not (tmp_path / "new").exists()
    index = tmp_path / "idx"
    run(cli, "index", tmp_path / "photos", "--index", index, *tiny_model.cli_args())
    for shard in (index / "vectors").glob("*.npy"):
        shard.unlink()
    (tmp_path / "photos" / "new.png").write_bytes((next((tmp_path / "photos").iterdir())).read_bytes())
    assert_one_line_error(cli.invoke(app, ["index", str(tmp_path / "photos"), "--index", str(index)]), "check --repair")
    assert_one_line_error(cli.invoke(app, ["build", "--index", str(index)]), "check --repair")


def test_check_and_repair_truncated_catalog_and_missing_shard(cli, tmp_path, tiny_model):
    items = make_images(tmp_path / "photos", 30, seed=52)
    captions = tmp_path / "caps.txt"
    captions.write_text("a red circle\na blue square\n")
    index = tmp_path / "idx"
    run(
        cli,
        "index",
        tmp_path / "photos",
        "--texts",
        captions,
        "--index",
        index,
        *tiny_model.cli_args(),
        "--batch-size",
        "8",
        "--commit-every",
        "1",
    )
    catalog = index / "catalog.duckdb"
    catalog.write_bytes(catalog.read_bytes()[:4096])
    result = cli.invoke(app, ["check", "--index", str(index), "--json"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr + result.stdout
    assert any("catalog.duckdb cannot be" in p and "--repair" in p for p in json.loads(result.stdout)["problems"])
    assert len(all_hits(cli, index)) == 30  # searches never needed the catalog
    result = cli.invoke(app, ["check", "--repair", "--index", str(index), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    repaired = json.loads(result.stdout)
    assert repaired["ok"] and any("rebuilt it from snapshot" in a for a in repaired["repair"]["actions"])
    assert json.loads(run(cli, "index", tmp_path / "photos", "--index", index, "--json"))["unchanged"] == 30

    first_shard = sorted((index / "vectors").glob("*.npy"))[0]
    lost = len(np.load(first_shard))
    first_shard.unlink()
    result = cli.invoke(app, ["check", "--index", str(index), "--json"])
    assert result.exit_code == 1 and any(
        f"{first_shard.name} is missing" in p for p in json.loads(result.stdout)["problems"]
    )
    result = cli.invoke(app, ["check", "--repair", "--index", str(index)])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert f"encoded {lost} images again from their files" in result.stderr and "lost:" not in result.stderr
    assert len(all_hits(cli, index)) == 30  # the photos are all still there: nothing is lost
    summary = json.loads(run(cli, "index", tmp_path / "photos", "--index", index, "--json"))
    assert summary["added"] == 0 and summary["unchanged"] == 30
    assert check_index(index).ok and items


def test_format_1_index_is_upgraded(cli, tmp_path, tiny_model):
    """An index written before paths were canonical: duplicates under two spellings, no caption links."""
    items = make_images(tmp_path / "photos", 5, seed=53)
    captions = tmp_path / "caps.csv"
    captions.write_text(f"image,caption\nphotos/{items[0][0].name},first\n")
    index = tmp_path / "idx"
    run(cli, "index", tmp_path / "photos", "--texts", captions, "--index", index, *tiny_model.cli_args())
    con = duckdb.connect(str(index / "catalog.duckdb"))
    spelled = f"{tmp_path}/photos/../photos/{items[1][0].name}"
    con.execute(
        "INSERT INTO items SELECT * REPLACE (id + 100 AS id, ? AS path) FROM items WHERE path = ? AND kind = 'image'",
        [spelled, str(items[1][0])],
    )
    con.execute("ALTER TABLE items DROP COLUMN link")
    con.close()
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["format_version"] = 1
    (index / "manifest.json").write_text(json.dumps(manifest))
    summary = json.loads(run(cli, "index", tmp_path / "photos", "--texts", captions, "--index", index, "--json"))
    assert summary["added"] == 0 and summary["removed"] == 0
    assert sorted(r[0] for r in catalog_rows(index)) == sorted(str(p) for p, _ in items)
    assert json.loads((index / "manifest.json").read_text())["format_version"] == 2
    assert {h["text"]: h["path"] for h in all_hits(cli, index, "texts")} == {"first": str(items[0][0])}
    assert check_index(index).ok


def test_odd_inputs_fail_one_row_not_the_run(cli, tmp_path, tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = tmp_path / "caps.csv"
    big.write_text("caption\nfirst caption\n" + '"' + "x" * 200_000 + '"\n' + "last caption\n")
    index = tmp_path / "idx"
    summary = json.loads(run(cli, "index", "--texts", big, "--index", index, *tiny_model.cli_args(), "--json"))
    assert summary["added"] == 2 and summary["failed"] == 1
    table = pa.table({"caption": [f"caption {i}" for i in range(30)]})
    good = tmp_path / "good.parquet"
    pq.write_table(table, good, row_group_size=10)
    data = bytearray(good.read_bytes())
    meta = pq.ParquetFile(good).metadata.row_group(1).column(0)
    start = meta.data_page_offset
    data[start + 20 : start + 60] = b"\xff" * 40  # corrupt the second row group's page
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(bytes(data))
    summary = json.loads(run(cli, "index", "--texts", broken, "--index", index, "--json"))
    assert summary["added"] == 20 and summary["failed"] == 1
    failed = json.loads(run(cli, "info", "--index", index, "--failed", "--json"))["failures"]
    assert any("row group 1 (rows 11-20) is unreadable" in f["error"] for f in failed)


def test_identical_files_in_one_run_are_encoded_once(cli, tmp_path, tiny_model):
    items = make_images(tmp_path / "photos", 3, seed=54)
    for i in range(4):
        shutil.copy(items[0][0], tmp_path / "photos" / f"copy{i}.png")
    index = tmp_path / "idx"
    run(cli, "index", tmp_path / "photos", "--index", index, *tiny_model.cli_args())
    locations = catalog_rows(index, "SELECT shard, row FROM items WHERE kind = 'image'")
    assert len(locations) == 7 and len(set(locations)) == 3
    assert sum(len(np.load(p)) for p in (index / "vectors").glob("*.npy")) == 3


def test_query_images_are_decoded_as_indexing_decodes_them(cli, tmp_path, tiny_model):
    from PIL import Image

    from clipdex.retrieval.imaging.decode import decode_image

    strip = tmp_path / "photos" / "strip.png"
    strip.parent.mkdir()
    Image.new("RGB", (60_000, 3), (200, 40, 40)).save(strip)
    make_images(tmp_path / "photos", 4, seed=55)
    index = tmp_path / "idx"
    run(cli, "index", tmp_path / "photos", "--index", index, *tiny_model.cli_args())
    hit = search_json(cli, index, "--image", strip, "--include-self", "-k", "1")["results"][0]
    assert hit["path"] == str(strip) and hit["score"] == pytest.approx(1.0, abs=1e-5)  # same aspect guard
    limit = Image.MAX_IMAGE_PIXELS
    decode_image(strip.read_bytes(), max_pixels=10**12)
    assert limit == Image.MAX_IMAGE_PIXELS  # PIL's own protection is left as it was


def test_unknown_ids_are_an_index_problem_not_an_index_error(tmp_path, tiny_model, cli):
    from clipdex.retrieval.errors import IndexFormatError

    make_images(tmp_path / "photos", 4, seed=56)
    run(cli, "index", tmp_path / "photos", "--index", tmp_path / "idx", *tiny_model.cli_args())
    searcher = Searcher(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="clipdex check"):
        searcher.vectors(np.array([10_000], dtype=np.int64))


def test_text_rankings_after_reindexing_captions(cli, tmp_path, tiny_model, reference):
    """Editing a caption file: changed rows are replaced, the ranking is brute force over the rows now there."""
    corpus = tmp_path / "texts.txt"
    first = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]
    corpus.write_text("\n".join(first) + "\n")
    index = tmp_path / "idx"
    run(cli, "index", "--texts", corpus, "--index", index, *tiny_model.cli_args())
    second = [*first[2:], "a purple cross", "a white triangle"]
    corpus.write_text("\n".join(second) + "\n")
    summary = json.loads(run(cli, "index", "--texts", corpus, "--index", index, "--json"))
    assert counts(summary) == {"added": 2, "updated": 0, "removed": 2, "unchanged": 4, "failed": 0}
    got = search_json(cli, index, "purple", "--target", "texts", "-k", "10")["results"]
    order, scores = brute_force(reference.texts(["purple"])[0], reference.texts(second), 6)
    assert_same_ranking([h["text"] for h in got], [h["score"] for h in got], [second[i] for i in order], scores)


def test_check_and_an_indexer_never_meet_in_the_catalog(cli, tmp_path, tiny_model):
    from clipdex.retrieval.store.lock import acquire_lock

    make_images(tmp_path / "photos", 4, seed=57)
    index = tmp_path / "idx"
    run(cli, "index", tmp_path / "photos", "--index", index, *tiny_model.cli_args())
    held = acquire_lock(index, holder="clipdex check")  # a check in progress
    try:
        result = cli.invoke(app, ["index", str(tmp_path / "photos"), "--index", str(index)])
        assert_one_line_error(result, "being written by clipdex check")
    finally:
        held.close()
    held = acquire_lock(index)  # an indexing run in progress
    try:
        report = check_index(index)
        assert report.ok and any("indexing run holds the index" in n for n in report.notes)
    finally:
        held.close()


def test_an_unplugged_root_is_offline_not_deleted(cli, tmp_path, tiny_model):
    """A root that disappears (a drive unplugged) keeps its items, offline: hidden from searches, shown flagged with
    --offline show, counted by info; plugged back in, nothing is re-encoded and they are searchable again."""
    make_images(tmp_path / "photos", 5, seed=61)
    drive = tmp_path / "mnt" / "drive"
    on_drive = make_images(drive, 6, seed=62)
    index = tmp_path / "idx"
    run(cli, "index", tmp_path / "photos", drive, "--index", index, *tiny_model.cli_args())
    everything = search_json(cli, index, "a red circle", "-k", 20)["results"]
    drive_paths = {str(p) for p, _ in on_drive}

    unplugged = tmp_path / "mnt" / "elsewhere"
    drive.rename(unplugged)
    result = cli.invoke(app, ["index", str(tmp_path / "photos"), str(drive), "--index", str(index), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert counts(summary) == {"added": 0, "updated": 0, "removed": 0, "unchanged": 5, "failed": 0}
    assert any(f"{drive} is missing: its 6 items are kept, offline" in n for n in summary["notes"])
    info = json.loads(run(cli, "info", "--index", index, "--json"))
    assert info["offline"] == {"folders": [str(drive)], "items": 6}
    hidden = search_json(cli, index, "a red circle", "-k", 20)["results"]
    assert [h["id"] for h in hidden] == [h["id"] for h in everything if h["path"] not in drive_paths]
    shown = search_json(cli, index, "a red circle", "-k", 20, "--offline", "show")["results"]
    assert [h["id"] for h in shown] == [h["id"] for h in everything]
    assert {h["path"] for h in shown if h.get("offline")} == drive_paths
    bad = cli.invoke(app, ["search", "x", "--index", str(index), "--offline", "maybe"])
    assert bad.exit_code == 2 and "--offline is hide or show" in bad.stderr
    copy = tmp_path / "copy.idx"  # `remove` of the missing root takes its items and its offline mark
    shutil.copytree(index, copy)
    assert json.loads(run(cli, "remove", drive, "--index", copy, "--json"))["removed"] == 6
    assert json.loads(run(cli, "info", "--index", copy, "--json"))["offline"] == {"folders": [], "items": 0}

    unplugged.rename(drive)  # plugged back in: nothing to encode, nothing offline
    back = json.loads(run(cli, "index", tmp_path / "photos", drive, "--index", index, "--json"))
    assert counts(back) == {"added": 0, "updated": 0, "removed": 0, "unchanged": 11, "failed": 0}
    assert json.loads(run(cli, "info", "--index", index, "--json"))["offline"]["items"] == 0
    assert search_json(cli, index, "a red circle", "-k", 20)["results"] == everything


def test_sort_orders_what_was_found_by_date_and_name(cli, tmp_path, tiny_model):
    """--sort reorders the k found (the same items as by score) by date (the files' mtimes here: no EXIF) or name,
    against an order computed from the files themselves."""
    made = make_images(tmp_path / "photos", 9, seed=71)
    for n, (path, _) in enumerate(made):
        when = 1_600_000_000 + ((n * 7) % 9) * 86_400  # shuffled days
        os.utime(path, (when, when))
    index = tmp_path / "idx"
    run(cli, "index", tmp_path / "photos", "--index", index, *tiny_model.cli_args())
    by_score = search_json(cli, index, "a red circle", "-k", 6)["results"]
    found = {h["path"] for h in by_score}
    for sort, key, reverse in (("date", os.path.getmtime, False), ("-date", os.path.getmtime, True),
                               ("name", lambda p: Path(p).name.casefold(), False)):  # fmt: skip
        got = search_json(cli, index, "a red circle", "-k", 6, "--sort", sort)["results"]
        assert {h["path"] for h in got} == found
        assert [h["path"] for h in got] == sorted(found, key=key, reverse=reverse), sort
        assert [h["rank"] for h in got] == list(range(1, 7))
    bad = cli.invoke(app, ["search", "x", "--index", str(index), "--sort", "size"])
    assert bad.exit_code == 2 and "--sort is score, date, -date or name" in bad.stderr
