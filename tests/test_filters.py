"""Filters: EXIF recorded at index time; filtered rankings equal brute force over the matching items, for flat and
IVF indexes; the ANN path keeps recall; a filter cannot read files."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone

import numpy as np
import pytest
from conftest import LOCAL, assert_same_ranking, run, search_json
from corpus import make_images
from fastapi.testclient import TestClient
from PIL import Image

from clipdex.cli.main import app
from clipdex.retrieval.imaging.decode import photo_meta
from clipdex.retrieval.search.filters import Filter
from clipdex.retrieval.search.query import Query
from clipdex.retrieval.search.searcher import Searcher, Target
from clipdex.retrieval.serve.app import ServeConfig, create_app

TAKEN = "2021:07:04 10:30:00"


def _with_exif(src, dest, *, camera: bool, gps: bool) -> None:
    exif = Image.Exif()
    if camera:
        exif[0x010F], exif[0x0110] = "Canon", "Canon EOS 5D"
        exif.get_ifd(0x8769)[0x9003] = TAKEN
    if gps:
        g = exif.get_ifd(0x8825)
        g[1], g[2], g[3], g[4] = "N", (40.0, 26.0, 46.0), "W", (79.0, 58.0, 56.0)
    Image.open(src).convert("RGB").save(dest, "JPEG", quality=95, exif=exif)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("filtered")
    a = [p for p, _ in make_images(root / "photos" / "a", 20, seed=161)]
    b = [p for p, _ in make_images(root / "photos" / "b", 20, seed=162)]
    for i, p in enumerate(b[:6]):  # six JPEGs from one camera, two of them with a position
        _with_exif(p, p.with_suffix(".jpg"), camera=True, gps=i < 2)
        p.unlink()
    old = datetime(2019, 1, 1, tzinfo=timezone.utc).timestamp()
    for p in a[:5]:
        os.utime(p, (old, old))
    run(CliRunner(), "index", root / "photos", "--index", root / "idx", *tiny_model.cli_args())
    paths = sorted(p for p in (root / "photos").rglob("*") if p.is_file())
    return root, root / "idx", paths


def _brute(reference, paths, query, keep, k):
    kept = [p for p in paths if keep(p)]
    vecs = reference.images(kept)
    q = reference.texts([query])[0]
    scores = vecs @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [str(kept[i]) for i in order], scores[order]


def test_exif_is_read(library):
    _, _, paths = library
    with_gps = [p for p in paths if p.suffix == ".jpg"][:1]
    meta = photo_meta(Image.open(with_gps[0]))
    assert (
        meta.camera == "Canon EOS 5D" and meta.taken_at == datetime(2021, 7, 4, 10, 30, tzinfo=timezone.utc).timestamp()
    )
    assert meta.lat == pytest.approx(40.4461, abs=1e-4) and meta.lon == pytest.approx(-79.9822, abs=1e-4)


@pytest.mark.parametrize(
    ("args", "keep"),
    [
        (["--where", "camera = 'Canon EOS 5D'"], lambda p: p.suffix == ".jpg"),
        (["--where", "lat > 40 AND lon < -79"], lambda p: p.suffix == ".jpg" and p.stem.endswith(("0000", "0001"))),
        (["--where", "ext = 'png' AND folder LIKE '%/b'"], lambda p: p.suffix == ".png" and p.parent.name == "b"),
        (["--in", "PHOTOS/a"], lambda p: p.parent.name == "a"),
        (["--before", "2020-01-01"], lambda p: p.parent.name == "a" and int(p.stem[-4:]) < 5),
        (["--after", "2021-07-04T10:30", "--before", "2021-07-05"], lambda p: p.suffix == ".jpg"),
        (["--where", "width >= 0"], lambda p: True),
    ],
)
@pytest.mark.parametrize("index_type", [None, "IVF4,Flat"])
def test_filtered_rankings_equal_brute_force(cli, library, reference, tmp_path, args, keep, index_type):
    root, index, paths = library
    if index_type:
        shutil.copytree(index, tmp_path / "idx")
        index = tmp_path / "idx"
        run(cli, "build", "--index", index, "--index-type", index_type)
    args = [a.replace("PHOTOS", str(root / "photos")) for a in args]
    got = search_json(cli, index, "a red circle", *args, "-k", 10)
    want_paths, want_scores = _brute(reference, paths, "a red circle", keep, 10)
    assert got["filter"]["matched"] == sum(map(keep, paths)) and got["filter"]["method"] == "exact"
    assert len(got["results"]) == min(10, len(want_paths))  # k results whenever k items match
    assert_same_ranking(
        [r["path"] for r in got["results"]], [r["score"] for r in got["results"]], want_paths, want_scores
    )


def test_min_score_and_the_api(cli, library):
    root, index, _ = library
    full = search_json(cli, index, "a red circle", "-k", 40)["results"]
    cut = full[12]["score"]
    got = search_json(cli, index, "a red circle", "-k", 40, "--min-score", cut)["results"]
    assert got == full[: len(got)] and all(r["score"] >= cut for r in got) and len(got) >= 13
    client = TestClient(create_app(Searcher(index), ServeConfig(index)), base_url=LOCAL)
    api = client.get(
        "/api/search", params={"q": "a red circle", "in": str(root / "photos" / "b"), "after": "2021-01-01", "k": 5}
    ).json()
    assert api == search_json(
        cli, index, "a red circle", "--in", root / "photos" / "b", "--after", "2021-01-01", "-k", 5
    )
    assert client.get("/api/search", params={"q": "x", "where": "1=1"}).json()["results"]  # no SQL: ignored param
    assert client.get("/api/search", params={"q": "x", "after": "yesterday"}).status_code == 400


def test_the_ann_path_keeps_recall_within_the_filter(library, reference, tmp_path, cli, monkeypatch):
    from clipdex.retrieval import ann

    root, index, paths = library
    shutil.copytree(index, tmp_path / "idx")
    run(cli, "build", "--index", tmp_path / "idx", "--index-type", "IVF4,Flat")
    monkeypatch.setattr(ann, "EXACT_MAX", 3)  # so that 20 matching items go through the IVF index
    searcher = Searcher(tmp_path / "idx")
    where = Filter(in_folder=root / "photos" / "a")
    assert searcher.filter_plan(where, Target.IMAGES) == {
        "in": str(root / "photos" / "a"),
        "matched": 20,
        "indexed": len(paths),
        "method": "ann",
    }
    recalls = []
    for text in ("a red circle", "a blue square", "a green triangle", "a black cross", "a white circle"):
        hits = searcher.search(Query.build(text=text), k=10, where=where)
        assert len(hits) == 10 and all(h.path.startswith(str(root / "photos" / "a")) for h in hits)
        want, _ = _brute(reference, paths, text, lambda p: p.parent.name == "a", 10)
        recalls.append(len({h.path for h in hits} & set(want)) / 10)
    target = json.loads((tmp_path / "idx" / "manifest.json").read_text())["ann"]["images"]["recall_at_10"]
    assert np.mean(recalls) >= min(target, 0.95) - 0.05, (recalls, target)


def test_a_filter_that_matches_nothing_says_so(cli, library):
    """Not "the index holds no images": it holds 40, and the filter kept none of them."""
    _root, index, paths = library
    for args in (["a red circle", "--where", "width > 100000"], ["x", "--in", "/etc"]):
        result = cli.invoke(app, ["search", *args, "--index", str(index), "--no-server"])
        assert result.exit_code == 0, result.stderr
        assert f"no image matches the filter ({len(paths)} images indexed)" in result.stderr, result.stderr


def test_a_filter_cannot_read_files_or_run_statements(cli, library):
    from clipdex.cli.main import app

    _, index, _ = library
    for where, needle in [
        ("path IN (SELECT column0 FROM read_csv('/etc/passwd'))", "disabled"),
        ("1=1; SET enable_external_access = true", "not an SQL expression"),  # the `;` cannot close it
        ("no_such_column > 3", "no_such_column"),
        ("width >", "not an SQL expression"),
    ]:
        r = cli.invoke(app, ["search", "a dog", "--index", str(index), "--where", where])
        assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, (where, r.stderr)
