"""Words in images: `index --ocr` reads them (RapidOCR), `search --mode semantic|lexical|hybrid` finds them.

Images of words are drawn in Debian's DejaVu fonts on photo-like backgrounds, turned up to 25° either way (and one
set at 90° and 180°); each is found by its words in lexical and hybrid search, whatever their case, by a prefix or
a part of a word. Lexical matches equal a brute-force scan of the stored words (every query word a substring), in
FTS5's BM25 order computed by hand; hybrid scores equal reciprocal-rank fusion of the two rankings computed apart;
on shapes, where no image holds words, hybrid ranks exactly as semantic search does, and with captions it finds
at least what semantic search finds.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import LOCAL, run, search_json
from corpus import draw_words, make_captioned_library, make_images, make_word_images
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer.config import IndexConfig
from clipdex.indexer.pipeline import EncoderCache, run_index
from clipdex.retrieval.config import Kind
from clipdex.retrieval.model.ocr import WordReader
from clipdex.retrieval.search.fusion import RRF_K, reciprocal_rank_fusion
from clipdex.retrieval.search.query import Query
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.app import ServeConfig, create_app
from clipdex.retrieval.store import words

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").is_file(), reason="Debian's fonts-dejavu-core"
)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("ocr")
    made = make_word_images(root / "photos", 14, seed=70)
    for angle, (i, text) in zip((90, 180), enumerate(("Museum Gate", "harbour exit")), strict=True):
        path = root / "photos" / f"turned_{i}.jpg"
        draw_words(text, 9000 + i, angle=angle).save(path, quality=90)
        made.append((path, text))
    make_images(root / "photos", 10, seed=71)  # shapes: no words
    run(CliRunner(), "index", root / "photos", "--index", root / "idx", "--ocr", *tiny_model.cli_args())
    return root, {str(p): t for p, t in made}


def stored_words(index: Path) -> dict[str, str]:
    s = Searcher(index)
    rows = s._rows(s._snap).to_pylist()
    return {r["path"]: r["ocr"] for r in rows if r["kind"] == "image"}


def test_ocr_reads_the_words_of_rotated_text_on_photo_like_backgrounds(library):
    root, made = library
    stored = stored_words(root / "idx")
    squash = lambda t: "".join(t.upper().split())  # noqa: E731 (a line's spaces may be read or not)
    read = [all(w in squash(stored[p]) for w in text.upper().split()) for p, text in made.items()]
    assert sum(read) >= len(read) - 1, {p: stored[p] for p in made}
    shapes = [p for p in stored if p not in made]
    assert all(stored[p] is not None for p in shapes)  # read: "" when there are no words
    assert sum(len(stored[p]) > 2 for p in shapes) <= 1


def test_each_image_is_found_by_its_words_in_lexical_and_hybrid_search(library, cli):
    root, made = library
    rng = random.Random(5)
    found = {"lexical": 0, "hybrid": 0}
    for path, text in made.items():
        word = rng.choice(text.split())
        asked = rng.choice((str.lower, str.upper, str.title))(word)
        for mode in found:
            answer = search_json(cli, root / "idx", asked, "--mode", mode, "-k", "10")
            assert answer["mode"] == mode
            found[mode] += path in [h["path"] for h in answer["results"]]
    assert found["lexical"] >= len(made) - 1 and found["hybrid"] >= len(made) - 1, found
    default = search_json(cli, root / "idx", "harbour")
    assert default["mode"] == "hybrid"  # the default where the index reads words
    assert search_json(cli, root / "idx", "harbour", "--mode", "semantic")["mode"] == "semantic"


def test_prefixes_and_parts_of_words_match(library, cli):
    root, made = library
    stored = stored_words(root / "idx")
    start = words.query_words(next(iter(made.values())))[0][:2]  # the start of a word drawn
    for part in ("harb", "ARBOU", "useu", start):
        got = {h["path"] for h in search_json(cli, root / "idx", part, "--mode", "lexical", "-k", "50")["results"]}
        if len(part) >= 3:
            want = {p for p, w in stored.items() if w and part.casefold() in w.casefold()}
        else:  # a word of one or two characters matches the start of a word
            want = {p for p, w in stored.items() if w and any(t.startswith(part) for t in words.query_words(w))}
        assert got == want and want, part


def test_lexical_results_equal_a_scan_of_the_stored_words_in_bm25_order(library):
    root, _ = library
    s = Searcher(root / "idx")
    docs = {r["id"]: words.fold(r["ocr"]) for r in s._rows(s._snap).to_pylist() if r["ocr"]}
    for query in ("sale", "oslo", "a", "ing", "gate museum", "zz"):
        got = s.search(Query.build(text=query), k=50, mode="lexical")
        want = bm25_by_hand(docs, query)
        assert [h.id for h in got] == [i for i, _ in want], query
        np.testing.assert_allclose([h.score for h in got], [b for _, b in want], rtol=1e-6)


def bm25_by_hand(docs: dict[int, str], query: str) -> list[tuple[int, float]]:
    """FTS5's BM25 (k1 = 1.2, b = 0.75) over trigram tokens, for documents that hold every query word; a query of
    short words only ranks over unicode61 words instead (then only the set is compared, in FTS5's order)."""
    qwords = words.query_words(query)
    if not qwords:
        return []
    long = [w for w in qwords if len(w) >= 3]
    short = [w for w in qwords if len(w) < 3]
    tokens = lambda body: [t for t in words.query_words(body)]  # noqa: E731
    hold = {
        i: d
        for i, d in docs.items()
        if all(w in d for w in long) and all(any(t.startswith(w) for t in tokens(d)) for w in short)
    }
    if not long:
        n = len(docs)
        avg = sum(len(tokens(d)) for d in docs.values()) / n
        score = {}
        for i, d in hold.items():
            total = 0.0
            for w in short:
                df = sum(any(t.startswith(w) for t in tokens(x)) for x in docs.values())
                tf = sum(t.startswith(w) for t in tokens(d))
                total += _bm25_term(n, df, tf, len(tokens(d)), avg)
            score[i] = total
    else:
        n = len(docs)
        grams = {i: max(len(d) - 2, 0) for i, d in docs.items()}
        avg = sum(grams.values()) / n
        score = {}
        for i, d in hold.items():
            total = 0.0
            for w in long:
                df = sum(w in x for x in docs.values())
                tf = _occurrences(d, w)
                total += _bm25_term(n, df, tf, grams[i], avg)
            score[i] = total
    return sorted(score.items(), key=lambda pair: (-round(pair[1], 9), pair[0]))


def _bm25_term(n: int, df: int, tf: int, length: int, avg: float) -> float:
    idf = max(math.log((n - df + 0.5) / (df + 0.5)), 1e-6)
    return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / avg))


def _occurrences(text: str, word: str) -> int:
    return sum(text.startswith(word, i) for i in range(len(text)))


ALPHABET = "abcdeéü 0123-"


@given(
    st.lists(st.text(ALPHABET, min_size=1, max_size=40), min_size=1, max_size=30),
    st.lists(st.text(ALPHABET, min_size=1, max_size=6), min_size=1, max_size=3),
)
def test_full_text_matches_equal_brute_force_on_generated_documents(tmp_path_factory, bodies, query_parts):
    path = tmp_path_factory.mktemp("fts") / "words.sqlite"
    docs = [(i, "image" if i % 3 else "text", b) for i, b in enumerate(bodies)]
    words.build(path, docs)
    query = " ".join(query_parts)
    for kind in ("image", "text"):
        mine = {i: words.fold(b) for i, k, b in docs if k == kind}
        qwords = words.query_words(query)
        want = set()
        if qwords:
            want = {
                i
                for i, d in mine.items()
                if all(w in d if len(w) >= 3 else any(t.startswith(w) for t in words.query_words(d)) for w in qwords)
            }
        got = words.WordIndex(path).match(query, kind, 1000)
        assert set(got.ids.tolist()) == want
        assert list(got.scores) == sorted(got.scores, reverse=True)
        assert got.exhausted


def test_accents_and_case_fold_on_both_sides(tmp_path):
    path = tmp_path / "w.sqlite"
    words.build(path, [(1, "image", "ZÜRICH Hauptbahnhof"), (2, "image", "Zurich"), (3, "image", "Bern")])
    index = words.WordIndex(path)
    assert set(index.match("zurich", "image", 10).ids.tolist()) == {1, 2}
    assert set(index.match("Zürich", "image", 10).ids.tolist()) == {1, 2}
    assert set(index.match("hauptbahn", "image", 10).ids.tolist()) == {1}
    assert not len(index.match('"; DROP TABLE grams; --', "image", 10).ids)  # quoted, never an operator


def test_a_words_index_built_whole_starts_from_nothing_and_a_damaged_read_back_is_a_disk_error(tmp_path, monkeypatch):
    """A build from nothing never writes into what a failed run left at its path (a damaged file, a copy cut
    short); a file made just now that SQLite reads back "malformed" (a failing disk) is an I/O error on it, which
    clipdex says in one line, not SQLite's traceback."""
    import errno
    import sqlite3

    from clipdex.retrieval.errors import DiskIOError, disk_error

    docs = [(1, "image", "red circle"), (2, "image", "blue square")]
    path = tmp_path / "next.sqlite"
    for left in (b"SQLite format 3\x00" + b"\x07" * 5000, b"half a copy"):  # what a failed run left there
        path.write_bytes(left)
        assert words.build(path, docs, previous=tmp_path / "gone.sqlite") == 2
        assert set(words.WordIndex(path).match("circle", "image", 10).ids.tolist()) == {1}

    def malformed(path, rows, *, update):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(words, "_write", malformed)
    with pytest.raises(OSError) as e:
        words.build(path, docs)
    assert e.value.errno == errno.EIO and e.value.filename == str(path)
    assert isinstance(disk_error(e.value, tmp_path), DiskIOError)


def test_hybrid_is_reciprocal_rank_fusion_of_the_two_rankings(library):
    root, _ = library
    s = Searcher(root / "idx")
    for text in ("sale receipt", "a red circle", "station"):
        q = Query.build(text=text)
        semantic = s.search(q, k=100, mode="semantic")
        lexical = s.search(q, k=100, mode="lexical")
        hybrid = s.search(q, k=10, mode="hybrid")
        want = reciprocal_rank_fusion([[h.id for h in lexical], [h.id for h in semantic]])[:10]
        assert [h.id for h in hybrid] == [i for i, _ in want]
        np.testing.assert_allclose([h.score for h in hybrid], [f for _, f in want])
        cos = {h.id: h.score for h in s.search(q, k=1000, mode="semantic")}
        for h in hybrid:
            assert h.semantic == pytest.approx(cos[h.id], abs=1e-5)
            assert (h.lexical is not None) == (h.id in {x.id for x in lexical})


def test_reciprocal_rank_fusion_against_its_definition():
    rng = random.Random(3)
    for _ in range(50):
        lists = [rng.sample(range(30), rng.randint(0, 20)) for _ in range(rng.randint(1, 3))]
        got = dict(reciprocal_rank_fusion(lists))
        for item in set().union(*map(set, lists)):
            want = sum(1 / (RRF_K + lst.index(item) + 1) for lst in lists if item in lst)
            assert got[item] == pytest.approx(want)
        scores = [f for _, f in reciprocal_rank_fusion(lists)]
        assert scores == sorted(scores, reverse=True)


def test_on_shapes_hybrid_ranks_as_semantic_search_does_and_with_captions_loses_nothing(tmp_path, tiny_model, cli):
    made = make_captioned_library(tmp_path, 40, 20, seed=72)
    run(cli, "index", tmp_path / "photos", "--texts", tmp_path / "captions.csv", "--index", tmp_path / "idx",
        "--ocr", *tiny_model.cli_args())  # fmt: skip
    s = Searcher(tmp_path / "idx")
    found = {"semantic": 0, "hybrid": 0}
    for colour, shape in [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "cross")]:
        relevant = {str(p) for p, sc in made if sc.colour == colour and sc.shape == shape}
        for mode in found:
            hits = s.search(Query.build(text=f"a {colour} {shape}"), k=10, mode=mode)
            found[mode] += len(relevant & {h.path for h in hits})
    assert found["hybrid"] >= found["semantic"], found
    # without any words (no captions, nothing read): the very same ranking
    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "photos", bare)
    run(cli, "index", bare, "--index", tmp_path / "bare-idx", "--ocr", *tiny_model.cli_args())
    b = Searcher(tmp_path / "bare-idx")
    compared = 0
    for text in ("a red circle", "blue", "a photo of a cross", "green square", "purple"):
        q = Query.build(text=text)
        if b.search(q, k=10, mode="lexical"):
            continue  # OCR read something in a drawing that happens to match
        compared += 1
        assert [h.id for h in b.search(q, k=10, mode="hybrid")] == [h.id for h in b.search(q, k=10, mode="semantic")]
    assert compared >= 3


def test_edits_renames_and_turning_ocr_on_later(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    made = make_word_images(photos, 4, seed=73)
    make_images(photos, 3, seed=74)
    index = tmp_path / "idx"
    run(CliRunner(), "index", photos, "--index", index, *tiny_model.cli_args())
    assert Searcher(index).search_mode(None, Query.build(text="x"), Kind.IMAGE) == "semantic"  # no OCR asked
    reader = CountingReader()
    cache = EncoderCache()
    cache.words = reader
    config = IndexConfig(paths=(photos,), index_dir=index, ocr=True)
    run_index(config, keep=cache)  # turned on: every image is read once
    assert reader.calls == 7
    stored = stored_words(index)
    first, text = made[0]
    assert "".join(text.upper().split()) in "".join(stored[str(first)].upper().split())
    moved = photos / "sub" / "moved.jpg"
    moved.parent.mkdir()
    first.rename(moved)  # the same content elsewhere keeps its words, unread
    again = IndexConfig(paths=(photos,), index_dir=index)  # no --ocr: the index keeps reading words
    run_index(again, keep=cache)
    assert reader.calls == 7 and stored_words(index)[str(moved)] == stored[str(first)]
    draw_words("Lisbon Cinema", 77).save(made[1][0], quality=90)  # edited: read again, old words gone
    run_index(again, keep=cache)
    assert reader.calls == 8
    s = Searcher(index)
    assert [h.path for h in s.search(Query.build(text="lisbon"), mode="lexical")] == [str(made[1][0])]
    old = made[1][1].split()[0]
    assert str(made[1][0]) not in [h.path for h in s.search(Query.build(text=old), mode="lexical")]
    assert s.search_mode(None, Query.build(text="x"), Kind.IMAGE) == "hybrid"
    run_index(IndexConfig(paths=(photos,), index_dir=index, ocr=False), keep=cache)
    draw_words("Oslo Hotel", 78).save(photos / "new.jpg", quality=90)
    run_index(again, keep=cache)
    assert reader.calls == 8  # off: new images are not read, and search is semantic again
    assert Searcher(index).search_mode(None, Query.build(text="x"), Kind.IMAGE) == "semantic"


class CountingReader(WordReader):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def read_file(self, path: Path, *, max_pixels: int) -> str:
        self.calls += 1
        return super().read_file(path, max_pixels=max_pixels)


def test_where_filters_and_output_show_the_words(library, cli):
    root, made = library
    some = next(t for t in made.values() if len(t.split()[0]) > 3).split()[0]
    answer = search_json(cli, root / "idx", "anything", "--mode", "semantic", "--where", f"ocr ILIKE '%{some}%'")
    assert answer["results"] and all(some.casefold() in h["ocr"].casefold() for h in answer["results"])
    plain = run(cli, "search", some, "--index", root / "idx", "--mode", "lexical")
    assert some.casefold() in plain.casefold() and "“" in plain  # the words read, beside the path


def test_bad_modes_are_one_line_errors(library, cli):
    root, _ = library
    for args, says in [
        (["x", "--mode", "fuzzy"], "--mode is semantic, lexical or hybrid"),
        (["--like", "1", "--mode", "lexical"], "takes one text query"),
        (["x", "--mode", "lexical", "--min-score", "0.1"], "min_score is a cosine"),
        (["x", "--mode", "hybrid", "--rerank", "4"], "rerank re-scores the semantic ranking"),
    ]:
        result = cli.invoke(app, ["search", *args, "--index", str(root / "idx")])
        assert result.exit_code != 0 and says in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_http_api_answers_as_the_library_does(library):
    root, _ = library
    s = Searcher(root / "idx")
    client = TestClient(create_app(s, ServeConfig(root / "idx")), base_url=LOCAL)
    for mode in ("lexical", "hybrid", "semantic"):
        body = client.get("/api/search", params={"q": "sale", "mode": mode, "k": 5}).json()
        want = s.search(Query.build(text="sale"), k=5, mode=mode)
        assert body["mode"] == mode and [h["id"] for h in body["results"]] == [h.id for h in want]
        assert [h.get("ocr") for h in body["results"]] == [h.ocr or None for h in want]
    bad = client.get("/api/search", params={"q": "sale", "mode": "fuzzy"})
    assert bad.status_code == 400 and "mode" in bad.json()["error"]
    assert client.post("/api/search", json={"like": 1, "mode": "lexical"}).status_code == 400


def test_a_snapshot_without_a_full_text_index_says_how_to_add_one(library, tmp_path):
    root, _ = library
    copy = tmp_path / "idx"
    shutil.copytree(root / "idx", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["snapshot"]["files"]["words"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="clipdex index --index"):
        Searcher(copy).search(Query.build(text="sale"), mode="lexical")


def test_a_watcher_reads_the_words_of_photos_copied_in(tmp_path, tiny_model):
    """`watch` on an index that reads words: a photo of words copied into the folder is found by them."""
    from clipdex.indexer.watch import WatchConfig, Watcher

    photos, index = tmp_path / "photos", tmp_path / "idx"
    make_images(photos, 3, seed=75)
    run(CliRunner(), "index", photos, "--index", index, "--ocr", *tiny_model.cli_args())
    config = WatchConfig(IndexConfig(paths=(photos,), index_dir=index, workers=0), settle_s=0.5, quiet_ms=150)
    watcher = Watcher(config)
    watcher.start()
    try:
        deadline = time.monotonic() + 30
        while watcher.status.runs < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        draw_words("Valencia Bakery", 76).save(tmp_path / "incoming.jpg", quality=90)
        (tmp_path / "incoming.jpg").rename(photos / "sign.jpg")
        s = Searcher(index)
        while not s.search(Query.build(text="valencia"), mode="lexical"):
            s.refresh()
            assert time.monotonic() < deadline + 30, watcher.status.to_json()
            time.sleep(0.2)
        assert [h.path for h in s.search(Query.build(text="bakery valencia"), mode="lexical")] == [
            str(photos / "sign.jpg")
        ]
    finally:
        watcher.stop.set()


@given(
    st.lists(st.text(ALPHABET, min_size=1, max_size=30), min_size=1, max_size=25),
    st.lists(st.text(ALPHABET, min_size=1, max_size=30), min_size=1, max_size=25),
    st.randoms(use_true_random=False),
)
def test_a_full_text_index_brought_up_to_date_equals_one_built_anew(tmp_path_factory, before, after, rng):
    """Publishing copies the last generation's index and re-indexes what changed: the same matches, the same BM25."""
    folder = tmp_path_factory.mktemp("fts-update")
    old = [(i, "image", b) for i, b in enumerate(before)]
    new = [(i + rng.randint(0, 5), rng.choice(("image", "text")), b) for i, b in enumerate(after)]
    new = list({i: (i, k, b) for i, k, b in new}.values())
    words.build(folder / "old.sqlite", old)
    words.build(folder / "updated.sqlite", new, previous=folder / "old.sqlite")
    words.build(folder / "fresh.sqlite", new)
    updated, fresh = words.WordIndex(folder / "updated.sqlite"), words.WordIndex(folder / "fresh.sqlite")
    for query in {*(b[:4] for b in after), *(b[:2] for b in before), "a", "abc"}:
        for kind in ("image", "text"):
            u, f = updated.match(query, kind, 100), fresh.match(query, kind, 100)
            assert u.ids.tolist() == f.ids.tolist() or set(u.ids.tolist()) == set(f.ids.tolist())
            np.testing.assert_allclose(np.sort(u.scores), np.sort(f.scores), rtol=1e-9)


def test_serve_watch_takes_ocr_and_serve_alone_refuses_it(library, cli):
    from clipdex.cli.common import Device
    from clipdex.cli.serve import _watcher

    root, _ = library
    assert _watcher(root / "idx", Device.auto, None, None, True).config.index.ocr is True
    assert _watcher(root / "idx", Device.auto, None, None).config.index.ocr is None  # as the index does
    refused = cli.invoke(app, ["serve", "--index", str(root / "idx"), "--ocr"])
    assert refused.exit_code == 2 and "use them with --watch" in refused.stderr
