"""`search --relevant`: every item at or above a cut-off calibrated on the query's own scores, against brute force.

The cut-off is computed by hand from open_clip's vectors of the files (the median of the query's cosines over the
library, plus 0.7 of the way to the mean of its best three); the returned set must be exactly the files at or above
it, best first, in the library, the CLI and the HTTP API alike. Filters and sorting compose with it; a sampled
library (past SAMPLE items) reads its median from a seeded sample and its best from the index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import LOCAL, run, search_json
from corpus import make_images
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clipdex.retrieval.config import Kind
from clipdex.retrieval.search import relevant as relevant_module
from clipdex.retrieval.search.query import Query
from clipdex.retrieval.search.relevant import RELEVANT_FRACTION, cutoff, sample_ids
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.app import ServeConfig, create_app

QUERIES = ["a red circle", "a photo of a small blue square on a plain background", "green", "a yellow cross"]


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("relevant")
    made = make_images(root / "photos", 60, seed=810)
    run(CliRunner(), "index", root / "photos", "--index", root / "idx", *tiny_model.cli_args())
    return root, sorted(str(p) for p, _ in made)


def by_hand(reference, paths: list[str], text: str) -> tuple[float, list[str]]:
    scores = reference.images([Path(p) for p in paths]) @ reference.texts([text])[0]
    centre = float(np.median(scores))
    best = float(np.sort(scores)[::-1][:3].mean())
    threshold = centre + RELEVANT_FRACTION * (best - centre)
    order = np.argsort(-scores, kind="stable")
    return threshold, [paths[i] for i in order if scores[i] >= threshold - 1e-6]


@pytest.mark.parametrize("text", QUERIES)
def test_the_relevant_set_is_every_file_at_or_above_the_querys_own_cut_off(library, reference, text):
    root, paths = library
    threshold, want = by_hand(reference, paths, text)
    searcher = Searcher(root / "idx")
    got = searcher.search(Query.build(text=text), relevant=True)
    near = {p for p in paths if abs(_score(reference, p, text) - threshold) < 2e-5}  # float ties at the edge
    assert {h.path for h in got} ^ set(want) <= near
    assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)
    assert searcher.relevance_cutoff(searcher.embed_query(Query.build(text=text)), Kind.IMAGE)


def _score(reference, path: str, text: str) -> float:
    return float(reference.images([Path(path)])[0] @ reference.texts([text])[0])


def test_each_query_gets_its_own_cut_off_and_k_gives_way(library):
    root, _ = library
    searcher = Searcher(root / "idx")
    cuts = {t: searcher.relevance_cutoff(searcher.embed_query(Query.build(text=t)), Kind.IMAGE)
            for t in QUERIES}  # fmt: skip
    assert len({round(c.threshold, 6) for c in cuts.values()}) == len(QUERIES)  # not one global threshold
    for c in cuts.values():
        assert c.centre < c.threshold <= c.best
    many = searcher.search(Query.build(text="green"), k=1, relevant=True)
    assert len(many) >= 3  # the best three are always at or above the cut-off; k does not cut them


def test_relevant_composes_with_filters_sort_and_refuses_rerank(library, reference):
    root, paths = library
    searcher = Searcher(root / "idx")
    from clipdex.retrieval.search.filters import Filter

    text = "a red circle"
    threshold, want = by_hand(reference, paths, text)
    near = {p for p in paths if abs(_score(reference, p, text) - threshold) < 2e-5}
    where = Filter.build(where="path LIKE '%_00%'")
    got = searcher.search(Query.build(text=text), relevant=True, where=where)
    assert {h.path for h in got} ^ {
        p for p in want if "_00" in p
    } <= near  # the cut-off is the library's, not the filter's
    named = searcher.search(Query.build(text=text), relevant=True, sort="name")
    assert {h.path for h in named} ^ set(want) <= near
    assert [Path(h.path).name for h in named] == sorted(Path(h.path).name for h in named)
    with pytest.raises(Exception, match="relevant cuts by the cosine"):
        searcher.search(Query.build(text=text), relevant=True, rerank=8)


def test_cli_and_http_equal_the_library(library):
    root, _ = library
    index = root / "idx"
    searcher = Searcher(index)
    want = [h.id for h in searcher.search(Query.build(text="a red circle"), relevant=True)]
    cli = search_json(CliRunner(), index, "a red circle", "--relevant", "--no-server")
    assert [h["id"] for h in cli["results"]] == want
    client = TestClient(create_app(searcher, ServeConfig(index)), base_url=LOCAL)
    body = client.get("/api/search", params={"q": "a red circle", "relevant": "true"}).json()
    assert [h["id"] for h in body["results"]] == want
    body = client.post("/api/search", json={"q": "a red circle", "relevant": True}).json()
    assert [h["id"] for h in body["results"]] == want
    result = CliRunner().invoke(_app(), ["search", "a red circle", "--index", str(index), "--relevant", "--rerank"])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _app():
    from clipdex.cli.main import app

    return app


def test_a_large_library_is_calibrated_on_a_seeded_sample(library, monkeypatch):
    root, _ = library
    monkeypatch.setattr(relevant_module, "SAMPLE", 20)
    import clipdex.retrieval.search.searcher as searcher_module

    monkeypatch.setattr(searcher_module, "sample_ids", lambda ids: relevant_module.sample_ids(ids, 20))
    searcher = Searcher(root / "idx")
    vector = searcher.embed_query(Query.build(text="a red circle"))
    ids = searcher.ids(Kind.IMAGE)
    sample = relevant_module.sample_ids(ids, 20)
    assert len(sample) == 20 and np.array_equal(sample, relevant_module.sample_ids(ids, 20))  # seeded: stable
    scores = searcher.vectors(sample) @ vector[0]
    everything = searcher.vectors(ids) @ vector[0]
    want = cutoff(scores, everything)  # the median of the sample, the best of the whole library
    got = searcher.relevance_cutoff(vector, Kind.IMAGE)
    assert got.threshold == pytest.approx(want.threshold, abs=1e-5)
    assert got.best == pytest.approx(float(np.sort(everything)[::-1][:3].mean()), abs=1e-5)
    assert json.dumps(got.to_json())


def test_the_cut_off_itself():
    c = cutoff(np.array([0.1, 0.2, 0.2, 0.3, 0.9, 0.8, 0.7]), np.array([0.9, 0.8, 0.7]))
    assert c.centre == pytest.approx(0.3) and c.best == pytest.approx(0.8)
    assert c.threshold == pytest.approx(0.3 + RELEVANT_FRACTION * 0.5)
    assert cutoff(np.array([]), np.array([])).threshold == float("inf")
    assert np.array_equal(sample_ids(np.arange(5), 10), np.arange(5))
