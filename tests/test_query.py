"""Query arithmetic, self-hiding, dedup and output habits, against brute force with open_clip used directly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import LOCAL, assert_same_ranking, run, search_json
from corpus import make_captioned_library
from fastapi.testclient import TestClient

from clipdex.retrieval.search.query import Query, weighted
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.app import ServeConfig, create_app


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("arith")
    made = make_captioned_library(root, 40, 25, seed=101)
    shutil.copy(made[0][0], root / "photos" / "copy_of_first.png")  # the same content at another path
    run(
        CliRunner(),
        "index",
        root / "photos",
        "--texts",
        root / "captions.csv",
        "--index",
        root / "idx",
        *tiny_model.cli_args(),
    )
    paths = sorted((root / "photos").iterdir())
    return root, root / "idx", made, paths


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_weight_prefixes():
    assert weighted("2:in the snow") == (2.0, "in the snow")
    assert weighted("0.5: at night", -1.0) == (-0.5, "at night")
    assert weighted("-1.5:indoors") == (-1.5, "indoors")
    assert weighted("in the snow") == (1.0, "in the snow")
    assert weighted("a:b") == (1.0, "a:b") and weighted("3:") == (1.0, "3:")


def test_arithmetic_equals_brute_force(cli, library, reference):
    _, index, made, paths = library
    corpus = reference.images(paths)
    q = ["a red circle", "on a blue background", "square", "2:a large shape", "0.5:small"]
    args = [q[0], "--add", q[1], "--subtract", q[2], "--add", q[3], "--subtract", q[4], "--add-image", made[3][0]]
    got = search_json(cli, index, *args, "-k", 10)
    t = reference.texts([q[0], q[1], q[2], "a large shape", "small"])
    image = reference.images([made[3][0]])[0]
    want = _unit(t[0] + t[1] - t[2] + 2 * t[3] - 0.5 * t[4] + image)
    order, scores = np.argsort(-(corpus @ want), kind="stable")[:10], np.sort(corpus @ want)[::-1][:10]
    assert_same_ranking(
        [r["path"] for r in got["results"]],
        [r["score"] for r in got["results"]],
        [str(paths[i]) for i in order],
        scores,
    )
    assert got["terms"][0] == {"weight": 1.0, "text": "a red circle"}
    assert {"weight": -0.5, "text": "small"} in got["terms"] and {"weight": 1.0, "image": str(made[3][0])} in got[
        "terms"
    ]
    # a subtracted image, and texts to texts
    got = search_json(cli, index, "a circle", "--subtract-image", made[5][0], "--target", "texts", "-k", 5)
    texts = [r["text"] for r in got["results"]]
    caption_vecs = reference.texts(texts)
    want = _unit(reference.texts(["a circle"])[0] - reference.images([made[5][0]])[0])
    np.testing.assert_allclose([r["score"] for r in got["results"]], caption_vecs @ want, atol=2e-5)


def test_terms_that_cancel_and_queries_without_a_positive_term_are_refused(cli, library):
    from clipdex.cli.main import app

    _, index, _, _ = library
    for args, needle in [
        (["a dog", "--subtract", "a dog"], "cancel out"),
        (["--subtract", "a dog"], "positive term"),
        (["--like", "99999"], "no item with id 99999"),
        (["--", "-1:a dog"], "positive term"),  # `--`: a leading minus is no option
    ]:
        r = cli.invoke(app, ["search", "--index", str(index), *args])
        assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_searching_by_what_is_indexed_hides_it_and_its_copies(cli, library, reference):
    _, index, made, paths = library
    first, copy = str(made[0][0]), str(made[0][0].parent / "copy_of_first.png")
    hits = search_json(cli, index, "--image", made[0][0], "--include-self", "-k", 3)["results"]
    assert {h["path"] for h in hits[:2]} == {first, copy}  # kept on request: itself (and its copy) first
    for flags in ((), ("--hide-self",)):
        hidden = search_json(cli, index, "--image", made[0][0], *flags, "-k", 38)["results"]
        assert {first, copy}.isdisjoint(r["path"] for r in hidden)
        assert len(hidden) == 38 and len(paths) == 41  # the two copies (and nothing else) are gone
        assert [h["rank"] for h in hidden] == list(range(1, 39))
    # the same image given from outside the index: its indexed copies go, by content
    outside = index.parent / "outside.png"
    shutil.copy(made[0][0], outside)
    assert {first, copy}.isdisjoint(r["path"] for r in search_json(cli, index, "--image", outside, "-k", 5)["results"])
    # an added image is part of the query too
    added = search_json(cli, index, "a red circle", "--add-image", made[1][0], "-k", 40)["results"]
    assert str(made[1][0]) not in {h["path"] for h in added} and len(added) == 40
    me = hits[0]["id"]
    liked = search_json(cli, index, "--like", me, "-k", 5)
    assert me not in [r["id"] for r in liked["results"]] and len(liked["results"]) == 5
    assert liked["query"] == f"like:{me}"
    kept = search_json(cli, index, "--like", me, "--include-self", "-k", 5)["results"]
    assert kept[0]["id"] == me and kept[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # like = the stored vector: equals brute force around it
    corpus = reference.images(paths)
    v = reference.images([made[0][0]])[0]
    order = [str(paths[i]) for i in np.argsort(-(corpus @ v), kind="stable")]
    got = [r["path"] for r in kept]
    assert set(got[:2]) == {first, str(made[0][0].parent / "copy_of_first.png")} and got[2:] == order[2:5]


def test_dedup_collapses_near_duplicates_as_greedy_brute_force_does(cli, library, reference):
    _, index, _, paths = library
    corpus = reference.images(paths)
    plain = search_json(cli, index, "a red circle", "-k", 41)["results"]
    deduped = search_json(cli, index, "a red circle", "--dedup", "--dedup-threshold", 0.9, "-k", 10)["results"]
    by_path = {str(p): corpus[i] for i, p in enumerate(paths)}
    kept: list[str] = []
    for r in plain:
        if all(float(by_path[r["path"]] @ by_path[k]) < 0.9 for k in kept):
            kept.append(r["path"])
    assert [r["path"] for r in deduped] == kept[:10]
    assert [r["rank"] for r in deduped] == list(range(1, len(deduped) + 1))
    assert len(kept) < 41  # the copy of the first image, at least, collapsed


def test_paths_and_piped_output(cli, library):
    _, index, _, _ = library
    results = search_json(cli, index, "a red circle", "-k", 6)["results"]
    printed = run(cli, "search", "a red circle", "--index", index, "-k", 6, "--paths").splitlines()
    assert printed == [r["path"] for r in results]
    piped = run(cli, "search", "a red circle", "--index", index, "-k", 6).splitlines()  # CliRunner is no terminal
    rows = [line.split("\t") for line in piped]
    assert [r[2] for r in rows] == [r["path"] for r in results]
    assert [r[3] for r in rows] == [r["text"] or "" for r in results]  # an image hit shows its caption
    assert not any(ch in "".join(piped) for ch in "┏┃━│")
    texts = run(cli, "search", "a red circle", "--index", index, "--target", "texts", "-k", 3).splitlines()
    assert all(line.split("\t")[2].endswith(".png") for line in texts)  # a text hit shows its image


def test_api_takes_the_same_arithmetic(cli, library):
    _, index, made, _ = library
    client = TestClient(create_app(Searcher(index), ServeConfig(index)), base_url=LOCAL)
    params = {"q": "a red circle", "add": ["on a blue background", "2:large"], "subtract": ["square"], "k": 7}
    api = client.get("/api/search", params=params).json()
    want = search_json(
        cli, index, "a red circle", "--add", "on a blue background", "--add", "2:large", "--subtract", "square", "-k", 7
    )
    assert api == want
    like = want["results"][0]["id"]
    api = client.get("/api/search", params={"like": like, "add": "red", "k": 5, "dedup": 0.9}).json()
    assert api == search_json(cli, index, "--like", like, "--add", "red", "--dedup", "--dedup-threshold", 0.9, "-k", 5)
    up = client.post(
        "/api/search",
        files={"image": ("q.png", made[0][0].read_bytes(), "image/png")},
        data={"subtract": "circle", "k": "5"},
    ).json()
    cli_json = search_json(cli, index, "--image", made[0][0], "--subtract", "circle", "-k", 5)
    assert up["results"] == cli_json["results"]
    assert str(made[0][0]) not in {h["path"] for h in up["results"]}
    kept = client.post(
        "/api/search",
        files={"image": ("q.png", made[0][0].read_bytes(), "image/png")},
        data={"include_self": "true", "k": "5"},
    ).json()
    assert kept["results"] == search_json(cli, index, "--image", made[0][0], "--include-self", "-k", 5)["results"]
    # image terms as uploads: the same as the CLI's --add-image / --subtract-image files
    files = [
        ("image", ("q.png", made[0][0].read_bytes(), "image/png")),
        ("add_image", ("a.png", made[1][0].read_bytes(), "image/png")),
        ("add_image", ("b.png", made[2][0].read_bytes(), "image/png")),
        ("subtract_image", ("c.png", made[3][0].read_bytes(), "image/png")),
    ]
    composed = client.post("/api/search", files=files, data={"k": "6", "add": "red"}).json()
    args = ["--image", made[0][0], "--add-image", made[1][0], "--add-image", made[2][0]]
    want = search_json(cli, index, *args, "--subtract-image", made[3][0], "--add", "red", "-k", 6)
    assert composed["results"] == want["results"] and len(composed["terms"]) == 5
    too_many = [("add_image", (f"{i}.png", made[1][0].read_bytes(), "image/png")) for i in range(5)]
    refused = client.post("/api/search", files=too_many, data={"q": "a dog"})
    assert refused.status_code == 400 and "at most 4" in refused.json()["error"]
    assert client.get("/api/search", params={"subtract": "dog"}).status_code == 400
    assert (
        json.dumps(Query.build(text="x", like=3).describe())
        == '[{"weight": 1.0, "text": "x"}, {"weight": 1.0, "like": 3}]'
    )
