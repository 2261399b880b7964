"""`clipdex export` writes clip-retrieval's layout; `clipdex import` reads it back to the same items and vectors."""

from __future__ import annotations

import json

import numpy as np
from conftest import run
from corpus import make_captioned_library

from clipdex.retrieval.search.searcher import Searcher, Target


def _contents(index) -> dict:
    s = Searcher(index)
    out = {}
    for target in (Target.IMAGES, Target.TEXTS):
        ids = s.ids(target)
        for row, vector in zip(s.rows(ids), s.vectors(ids), strict=True):
            key = (row["kind"], row["path"], row["text"] if row["kind"] == "text" else None, row.get("link"))
            out[key] = vector
    return out


def test_export_then_import_gives_the_same_index(cli, tmp_path, tiny_model):
    make_captioned_library(tmp_path, 12, 8, seed=141)
    (tmp_path / "loose.txt").write_text("a caption without an image\n")
    index = tmp_path / "idx"
    run(
        cli,
        "index",
        tmp_path / "photos",
        "--texts",
        tmp_path / "captions.csv",
        "--texts",
        tmp_path / "loose.txt",
        "--index",
        index,
        *tiny_model.cli_args(),
    )
    summary = json.loads(run(cli, "export", "--index", index, "--out", tmp_path / "out", "--json"))
    assert (summary["images"], summary["texts"]) == (12, 9)
    assert sorted(p.name for p in (tmp_path / "out" / "img_emb").iterdir()) == ["img_emb_0.npy"]
    assert sorted(p.name for p in (tmp_path / "out" / "text_emb").iterdir()) == ["text_emb_1.npy"]
    run(cli, "import", tmp_path / "out", "--index", tmp_path / "back", *tiny_model.cli_args())
    before, after = _contents(index), _contents(tmp_path / "back")
    assert before.keys() == after.keys()
    for key, vector in before.items():
        np.testing.assert_array_equal(after[key], vector)
    # half precision, for size: the same items, vectors to float16 precision
    run(cli, "export", "--index", index, "--out", tmp_path / "half", "--float16")
    assert np.load(tmp_path / "half" / "img_emb" / "img_emb_0.npy").dtype == np.float16
    from clipdex.cli.main import app

    again = cli.invoke(app, ["export", "--index", str(index), "--out", str(tmp_path / "out")])
    assert again.exit_code == 2 and "not an empty folder" in again.stderr
